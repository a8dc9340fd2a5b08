-- persist-worker's example table in deploy/compose.yaml (MEDIAFARM_PERSIST_TABLES there declares
-- the same columns): PostgreSQL runs this once, when its data volume is first created.
CREATE TABLE IF NOT EXISTS profiles (
    user_id    bigint PRIMARY KEY,
    avatar_url text,
    updated_at timestamptz,
    version    bigint NOT NULL DEFAULT 0
);
