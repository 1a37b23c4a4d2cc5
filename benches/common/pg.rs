//! PostgreSQL for the benchmarks: the server named by `TIMPORT_BENCH_DATABASE_URL` (a server URL
//! such as postgres://postgres@127.0.0.1:55432/postgres, superuser, on this machine), a fresh
//! database per run, and the CPU its server processes spent.

/// The server URL, when PostgreSQL runs are asked for.
pub fn server() -> Option<String> {
    std::env::var("TIMPORT_BENCH_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// Creates a database named `prefix_<pid>_<random>` and returns its URL.
pub async fn fresh_database(server: &str, prefix: &str) -> String {
    use sqlx::Connection;
    let name = format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let mut c = sqlx::PgConnection::connect(server).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut c)
        .await
        .expect("create database");
    let mut u = url::Url::parse(server).expect("url");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

/// The server's postmaster pid (from `postmaster.pid` in its data directory: same machine).
pub async fn postmaster_pid(server: &str) -> Option<u32> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(server).await.ok()?;
    let dir: String = sqlx::query_scalar("SHOW data_directory")
        .fetch_one(&mut c)
        .await
        .ok()?;
    std::fs::read_to_string(format!("{dir}/postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// CPU seconds the server has spent: the postmaster, the backends it has reaped (cutime,
/// cstime) and the ones alive now. Differences of two readings give what a run cost, provided
/// nothing else used the server meanwhile.
pub fn server_cpu(postmaster: u32) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let fields = |pid: u32| -> Option<Vec<u64>> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        Some(
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect(),
        )
    };
    // After the comm field: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    let mut ticks = fields(postmaster)
        .map(|f| f[11] + f[12] + f[13] + f[14])
        .unwrap_or(0);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(f) = fields(pid)
                && f[1] == u64::from(postmaster)
            {
                ticks += f[11] + f[12];
            }
        }
    }
    ticks as f64 / tick
}
