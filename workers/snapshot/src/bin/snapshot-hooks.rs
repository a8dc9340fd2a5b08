//! `snapshot-hooks`: the HTTP endpoint the media server's publish hooks call (nginx-rtmp
//! `on_publish` / `on_publish_done`, SRS `on_publish` / `on_unpublish`) to start and stop
//! `snapshot.watch` sessions by the per-application policy in `[hooks_apps.<app>]`. See
//! `snapshot_worker::hooks`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mediafarm::Settings;
use snapshot_worker::hooks::{Hooks, HooksSettings};

#[derive(Parser)]
#[command(
    name = "snapshot-hooks",
    version,
    about = "Publish hooks that start and stop snapshot.watch sessions"
)]
struct Args {
    /// Settings file (TOML); MEDIAFARM_<NAME> environment variables override it.
    #[arg(long, default_value = "mediafarm.toml")]
    config: PathBuf,
    /// Listen here instead of `hooks_addr`.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(short = 'l', long, default_value = "info")]
    loglevel: String,
    /// Print the settings this program reads and exit.
    #[arg(long)]
    setting_names: bool,
    /// Read the settings, report what is wrong, and exit.
    #[arg(long)]
    check_settings: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.setting_names {
        for name in mediafarm::runtime::cli::setting_names::<HooksSettings>() {
            println!("{name}");
        }
        return ExitCode::SUCCESS;
    }
    if let Err(e) = mediafarm::observe::logging::init(&args.loglevel) {
        eprintln!("snapshot-hooks: {e}");
        return ExitCode::from(2);
    }
    let config_given = args.config != std::path::Path::new("mediafarm.toml");
    let (settings, hooks) = match Settings::load_with::<HooksSettings>(&args.config, config_given) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("snapshot-hooks: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_settings {
        let mut lists = settings.lists();
        lists.extend(mediafarm::settings::Group::lists(&hooks));
        mediafarm::runtime::cli::print_accepted(&args.config, &lists);
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("snapshot-hooks: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async move {
        let addr = args.addr.unwrap_or(hooks.hooks_addr);
        let service = match Hooks::connect(&settings, &hooks).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("snapshot-hooks: {e}");
                return ExitCode::from(2);
            }
        };
        match service.serve(addr, stop_signal()).await {
            Ok((_, task)) => {
                let _ = task.await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("snapshot-hooks: cannot listen on {addr}: {e}");
                ExitCode::from(2)
            }
        }
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
