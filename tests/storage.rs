//! Object storage against real servers: a local directory, and a real S3-compatible server
//! (moto's, started on 127.0.0.1 from the project's `.venv`): put, get with a size limit, the
//! URLs results hand out (presigned, fetched over HTTP; public base URL; `file://`), key
//! checks, and errors a job can report.

use bytes::Bytes;
use mediafarm::storage::{Storage, StorageError};
use mediafarm::{FailureKind, Settings, TaskError};
use mediafarm_tests::s3::{http, Moto};
use mediafarm_tests::settings;

fn s3_settings(moto: &Moto, bucket: &str) -> Settings {
    // Credentials come from the environment, as in production; moto accepts any.
    std::env::set_var("AWS_ACCESS_KEY_ID", "test-key");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret");
    let mut s = settings();
    s.storage_url = format!("s3://{bucket}/media");
    s.storage_s3_endpoint = Some(moto.endpoint());
    s.storage_s3_path_style = true;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_put_get_and_presigned_urls_work_against_a_real_server() {
    let moto = Moto::start().await;
    let bucket = format!("mf-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let (status, _) = http(moto.port, "PUT", &format!("/{bucket}")).await.unwrap();
    assert_eq!(status, 200, "bucket created");
    let storage = Storage::from_settings(&s3_settings(&moto, &bucket)).unwrap();

    let data = Bytes::from_static(b"\xff\xd8\xff not really a jpeg");
    let stored = storage
        .put("avatars/42/512.jpg", data.clone(), "image/jpeg")
        .await
        .unwrap();
    assert_eq!(stored.bytes, data.len() as u64);
    assert_eq!(storage.get("avatars/42/512.jpg", 1024).await.unwrap(), data);
    // Without a signature the object is private, as S3 keeps it.
    let direct = format!("/{bucket}/media/avatars/42/512.jpg");
    assert_eq!(http(moto.port, "GET", &direct).await.unwrap().0, 403);

    // A presigned URL fetches the object without credentials.
    let url = url::Url::parse(&stored.url).unwrap();
    assert!(
        url.query().unwrap_or("").contains("X-Amz-Signature"),
        "{url}"
    );
    let target = format!("{}?{}", url.path(), url.query().unwrap());
    assert_eq!(url.path(), direct, "under the configured prefix");
    let (status, body) = http(moto.port, "GET", &target).await.unwrap();
    assert_eq!((status, body.as_slice()), (200, data.as_ref()));

    // Limits and missing objects are the job's fault, with the key in the message.
    let err = storage.get("avatars/42/512.jpg", 4).await.unwrap_err();
    assert!(
        matches!(err, StorageError::TooLarge { bytes, limit: 4, .. } if bytes == data.len() as u64)
    );
    let err = storage.get("avatars/43/512.jpg", 1024).await.unwrap_err();
    assert!(matches!(err, StorageError::NotFound { .. }), "{err}");
    let task_err: TaskError = err.into();
    assert_eq!(task_err.kind, FailureKind::Invalid);
    assert!(task_err.message.contains("avatars/43/512.jpg"));
    storage.delete("avatars/42/512.jpg").await.unwrap();
    assert!(matches!(
        storage.get("avatars/42/512.jpg", 1024).await,
        Err(StorageError::NotFound { .. })
    ));

    // With a public base URL, results point there instead.
    let mut s = s3_settings(&moto, &bucket);
    s.storage_public_base_url = Some("https://cdn.example.com/m/".into());
    let public = Storage::from_settings(&s).unwrap();
    assert_eq!(
        public.url("a/b.webp").await.unwrap(),
        "https://cdn.example.com/m/media/a/b.webp"
    );

    // A bucket that does not exist is named as such, and worth retrying once it is made.
    let missing = Storage::from_settings(&s3_settings(&moto, "no-such-bucket")).unwrap();
    let err = missing
        .put("k", Bytes::from_static(b"x"), "text/plain")
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::NoBucket { .. }), "{err}");
    assert!(matches!(
        TaskError::from(err).kind,
        FailureKind::Transient { .. }
    ));
}

#[tokio::test]
async fn local_directory_storage_and_key_checks() {
    let dir = mediafarm_tests::temp_dir("storage");
    let mut s = settings();
    s.storage_url = format!("file://{}", dir.display());
    let storage = Storage::from_settings(&s).unwrap();
    let stored = storage
        .put(
            "photos/1/640.webp",
            Bytes::from_static(b"RIFF....WEBP"),
            "image/webp",
        )
        .await
        .unwrap();
    let file = dir.canonicalize().unwrap().join("photos/1/640.webp");
    assert_eq!(std::fs::read(&file).unwrap(), b"RIFF....WEBP");
    assert_eq!(
        stored.url,
        url::Url::from_file_path(&file).unwrap().to_string()
    );
    assert_eq!(
        storage
            .get("photos/1/640.webp", 100)
            .await
            .unwrap()
            .as_ref(),
        b"RIFF....WEBP"
    );
    for bad in ["../outside", "/etc/passwd", "a//b", ""] {
        let err = storage
            .put(bad, Bytes::from_static(b"x"), "text/plain")
            .await
            .unwrap_err();
        assert!(
            matches!(err, StorageError::InvalidKey { .. }),
            "{bad:?}: {err}"
        );
    }
    assert!(!dir.parent().unwrap().join("outside").exists());
    std::fs::remove_dir_all(&dir).unwrap();

    // A storage_url that cannot work stops start-up with the reason.
    s.storage_url = "s3://".into();
    assert!(matches!(
        Storage::from_settings(&s),
        Err(StorageError::Config { .. })
    ));
}
