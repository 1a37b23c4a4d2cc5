//! PostgreSQL faults at the connection: TLS asked for by the URL, a read-only hot standby, and a
//! server that is not there. They need the cluster of `scripts/with-postgres.sh` (TLS with its
//! own CA in `TIMPORT_TEST_PG_CA`, a standby in `TIMPORT_TEST_STANDBY_URL`); without
//! `TIMPORT_TEST_DATABASE_URL` they skip, unless `TIMPORT_REQUIRE_POSTGRES=1` says they may not.

use std::process::Command;
use std::time::{Duration, Instant};

use timport::settings::Database;
use timport::store::{Store, StoreError, StoreOptions};

/// The server URL, or `None` (skip) when PostgreSQL tests are off.
fn server() -> Option<String> {
    match std::env::var("TIMPORT_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var("TIMPORT_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "TIMPORT_REQUIRE_POSTGRES=1 but TIMPORT_TEST_DATABASE_URL is not set"
            );
            eprintln!("skipped: TIMPORT_TEST_DATABASE_URL is not set");
            None
        }
    }
}

fn required(var: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set (scripts/with-postgres.sh sets it)"))
}

/// `url` with its database replaced by `db`.
fn with_db(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_path(&format!("/{db}"));
    u.to_string()
}

/// A fresh database on the server; its URL.
async fn fresh_db(server: &str, prefix: &str) -> String {
    use sqlx::Connection;
    let name = format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let mut c = sqlx::PgConnection::connect(server).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut c)
        .await
        .unwrap();
    with_db(server, &name)
}

fn add_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

/// Whether every connection this store's pool has open is encrypted.
async fn uses_tls(store: &Store) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pg_pool().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn tls_is_used_when_the_url_asks_for_it_and_a_certificate_is_checked_with_verify_full() {
    let Some(server) = server() else { return };
    let ca = required("TIMPORT_TEST_PG_CA");
    let url = fresh_db(&server, "tls").await;
    let opts = StoreOptions::default();

    let plain = Store::open(&Database::from(add_query(&url, "sslmode=disable")), &opts)
        .await
        .unwrap();
    assert!(!uses_tls(&plain).await, "sslmode=disable must not encrypt");
    plain.close().await;

    let required_url = add_query(&url, "sslmode=require");
    let s = Store::open(&Database::from(required_url), &opts)
        .await
        .unwrap();
    assert!(uses_tls(&s).await, "sslmode=require must encrypt");
    s.close().await;

    // verify-full: the certificate is for "localhost", signed by the test CA.
    let localhost = url.replace("127.0.0.1", "localhost");
    let verified = add_query(&localhost, &format!("sslmode=verify-full&sslrootcert={ca}"));
    let s = Store::open(&Database::from(verified), &opts).await.unwrap();
    assert!(uses_tls(&s).await);
    s.close().await;

    // Without the CA the certificate is not trusted: refused at start, password never shown.
    let untrusted = add_query(
        &localhost.replace("postgres@", "postgres:hunter2@"),
        "sslmode=verify-full",
    );
    let e = Store::open(&Database::from(untrusted), &opts)
        .await
        .unwrap_err();
    assert!(e.is_config(), "{e:?}");
    let text = format!("{e} {e:?}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("***"), "{text}");
}

#[tokio::test]
async fn idle_transactions_are_bounded_at_60s_unless_the_database_sets_its_own_bound() {
    let Some(server) = server() else { return };
    let opts = StoreOptions::default();
    let setting = |s: &Store| {
        let pool = s.pg_pool().unwrap().clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT current_setting('idle_in_transaction_session_timeout')",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    // Nothing set by the server, the database or the role: timport's own bound.
    let url = fresh_db(&server, "idle").await;
    let s = Store::open(&Database::from(url), &opts).await.unwrap();
    assert_eq!(setting(&s).await, "1min");
    s.close().await;

    // An operator's tighter bound on the database is kept.
    let url = fresh_db(&server, "idle").await;
    let name = url::Url::parse(&url)
        .unwrap()
        .path()
        .trim_start_matches('/')
        .to_owned();
    {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&server).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {name} SET idle_in_transaction_session_timeout = '10s'"
        )))
        .execute(&mut c)
        .await
        .unwrap();
    }
    let s = Store::open(&Database::from(url), &opts).await.unwrap();
    assert_eq!(setting(&s).await, "10s");
    s.close().await;
}

#[tokio::test]
async fn a_hot_standby_is_refused_for_writing_but_status_reads_it() {
    let Some(server) = server() else { return };
    let standby = required("TIMPORT_TEST_STANDBY_URL");
    let url = fresh_db(&server, "standby").await;
    let opts = StoreOptions::default();
    let primary = Store::open(&Database::from(url.clone()), &opts)
        .await
        .unwrap();
    let key = primary.meta("random_key").await.unwrap().unwrap();
    primary.close().await;

    let name = url::Url::parse(&url)
        .unwrap()
        .path()
        .trim_start_matches('/')
        .to_string();
    let on_standby = with_db(&standby, &name).replace("postgres@", "postgres:hunter2@");
    // The standby replays the new database within moments; wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let reader = loop {
        match Store::open_read_only(&Database::from(on_standby.clone()), &opts).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the standby never showed the queue: {e}"),
        }
    };
    assert_eq!(reader.meta("random_key").await.unwrap(), Some(key));
    reader.close().await;

    let e = Store::open(&Database::from(on_standby.clone()), &opts)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Standby { .. }), "{e:?}");
    assert!(e.is_config());
    let text = e.to_string();
    assert!(
        text.contains("read-only") && text.contains("primary"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    // The daemon says the same and exits 2.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(["run", "--until-idle", "--config", "config/local.toml"])
        .env("TIMPORT__QUEUE__DATABASE", &on_standby)
        .env("TIMPORT__QUEUE__SPOOL_DIR", dir.path().join("spool"))
        .env("TIMPORT__HTTP__LISTEN", "127.0.0.1:0")
        .env("TIMPORT__SIMULATOR__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stderr}{stdout}");
    assert!(stderr.contains("read-only"), "{stderr}");
    assert!(!stderr.contains("hunter2") && !stdout.contains("hunter2"));
}

#[tokio::test]
async fn a_server_that_is_not_there_is_named_at_start_with_exit_2() {
    // Needs no server: port 1 on loopback refuses at once.
    let url = "postgres://timport:hunter2@127.0.0.1:1/timport";
    let e = Store::open(&Database::from(url.to_string()), &StoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Unreachable { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    for args in [
        vec!["status"],
        vec!["ingest", "examples/team-chat.json"],
        vec!["retry", "--all"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_timport"))
            .args(&args)
            .args(["--config", "config/local.toml"])
            .env("TIMPORT__QUEUE__DATABASE", url)
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}: {all}");
        assert!(
            all.contains("unreachable") && all.contains("127.0.0.1:1"),
            "{args:?}: {all}"
        );
        assert!(!all.contains("hunter2"), "{args:?}: {all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_takes_intake_rows_when_notified_without_waiting_for_its_poll() {
    let Some(server) = server() else { return };
    let url = fresh_db(&server, "notify").await;
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    // A poll once an hour: a row taken within the bound below was taken on its notification.
    let mut child = Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(["run", "--config", "config/local.toml"])
        .env("TIMPORT__QUEUE__DATABASE", &url)
        .env("TIMPORT__QUEUE__SPOOL_DIR", dir.path().join("spool"))
        .env("TIMPORT__QUEUE__INTAKE_POLL_INTERVAL", "1h")
        .env("TIMPORT__HTTP__LISTEN", "127.0.0.1:0")
        .env("TIMPORT__SIMULATOR__LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    // The daemon has created the schema and its first poll has run once the table exists and a
    // moment has passed; rows inserted from now on wait for a notification or an hour.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sqlx::query("SELECT 1 FROM intake LIMIT 1")
        .fetch_optional(&pool)
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the daemon never created its queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    sqlx::query(
        "INSERT INTO intake (group_id, from_account, send_time, msg_body)
         VALUES ('notify-g', 'alice', 1700000000,
                 '[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"hi\"}}]')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s: String = sqlx::query_scalar("SELECT status FROM intake")
            .fetch_one(&pool)
            .await
            .unwrap();
        if s != "new" || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    pool.close().await;
    assert_eq!(
        status, "queued",
        "the row was not taken on its notification"
    );
}
