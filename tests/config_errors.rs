//! Issue 12 point 4, "configuration mistakes are caught at start, exit 2, naming the key": the
//! real binary with mistaken configuration files, and the README's first command still working
//! with the built-in simulator and no credentials; `queue.database` as a path or a PostgreSQL URL
//! whose password is never shown.

mod common;

use std::path::Path;
use std::process::{Command, Output};

const SECRET: &str = "Qx7-secret-key-value-5bd2850fff3e";

/// `timport ARGS --config FILE` in `dir`, where FILE holds `toml`.
fn run_with(dir: &Path, toml: &str, args: &[&str]) -> Output {
    let file = dir.join("t.toml");
    std::fs::write(&file, toml).unwrap();
    Command::new(env!("CARGO_BIN_EXE_timport"))
        .args(args)
        .arg("--config")
        .arg(&file)
        .current_dir(dir)
        .env_remove("TIMPORT_CONFIG")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A configuration that would otherwise start: the built-in simulator, files under `dir`.
fn base(dir: &Path) -> String {
    format!(
        r#"
[tencent]
sdkappid = 1400000000
[queue]
database = "{d}/q.db"
spool_dir = "{d}/spool"
[http]
listen = ""
[simulator]
enabled = true
auto_create_groups = true
"#,
        d = dir.display()
    )
}

fn assert_config_error(o: &Output, key: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(key), "the key {key} is named: {err}");
    assert!(!err.contains(SECRET), "{err}");
}

#[test]
fn a_level_that_is_not_a_level_exits_2_naming_log_level() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_with(
        dir.path(),
        &format!("{}[log]\nlevel = \"infoo\"\n", base(dir.path())),
        &["run", "--until-idle"],
    );
    assert_config_error(&o, "log.level");
    assert!(stderr(&o).contains("infoo"));
    // A filter with targets still works.
    let o = run_with(
        dir.path(),
        &format!(
            "{}[log]\nlevel = \"warn,timport::engine=info\"\n",
            base(dir.path())
        ),
        &["run", "--until-idle"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("import engine started"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn sdkappid_0_against_tencent_exits_2_before_any_request() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[tencent]\nsecret_key = \"{SECRET}\"\n[queue]\ndatabase = \"{d}/q.db\"\nspool_dir = \"{d}/spool\"\n[http]\nlisten = \"\"\n",
        d = dir.path().display()
    );
    let o = run_with(dir.path(), &toml, &["run", "--until-idle"]);
    assert_config_error(&o, "tencent.sdkappid");
    assert!(
        !dir.path().join("q.db").exists(),
        "refused before the database"
    );
}

#[test]
fn a_database_folder_or_a_spool_file_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    std::fs::create_dir(dir.path().join("db-folder")).unwrap();
    std::fs::write(dir.path().join("spool-file"), "").unwrap();
    let with_queue = |queue: &str| {
        format!(
            "[tencent]\nsdkappid = 1400000000\n[queue]\n{queue}\n[http]\nlisten = \"\"\n[simulator]\nenabled = true\n"
        )
    };
    for args in [
        &["run", "--until-idle"][..],
        &["status"][..],
        &["retry", "--all"][..],
    ] {
        let o = run_with(
            dir.path(),
            &with_queue(&format!(
                "database = \"{d}/db-folder\"\nspool_dir = \"{d}/spool\""
            )),
            args,
        );
        assert_config_error(&o, "queue.database");
        let o = run_with(
            dir.path(),
            &with_queue(&format!(
                "database = \"{d}/q.db\"\nspool_dir = \"{d}/spool-file\""
            )),
            args,
        );
        assert_config_error(&o, "queue.spool_dir");
    }
    let o = run_with(
        dir.path(),
        &with_queue(&format!(
            "database = \"{d}/spool-file/q.db\"\nspool_dir = \"{d}/spool\""
        )),
        &["run", "--until-idle"],
    );
    assert_config_error(&o, "queue.database");
}

#[test]
fn a_rate_above_the_documented_limit_is_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_with(
        dir.path(),
        &format!("{}[import]\nrequests_per_second = 500\n", base(dir.path())),
        &["run", "--until-idle"],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let warning = err
        .lines()
        .find(|l| l.contains("import.requests_per_second"))
        .unwrap_or_else(|| panic!("no warning: {err}"));
    assert!(
        warning.contains("WARN") && warning.contains("200"),
        "{warning}"
    );
}

#[test]
fn a_syntax_error_on_the_secret_line_does_not_echo_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    for broken in [
        format!("secret_key = \"{SECRET}\n"),
        format!("secret_key = {SECRET}\n"),
        format!("secret_key = '{SECRET}\" x\n"),
        format!("secret_key = \"{SECRET}\" trailing\n"),
    ] {
        let toml = format!("[tencent]\nsdkappid = 1400000000\n{broken}");
        for args in [&["run"][..], &["status"][..]] {
            let o = run_with(dir.path(), &toml, args);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{err}");
            assert!(!err.contains(SECRET), "{err}");
            assert!(!err.contains("Qx7"), "{err}");
            assert!(err.contains("line 3"), "the position is named: {err}");
        }
    }
}

#[test]
fn the_readme_first_command_runs_without_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::copy(
        root.join("config/local.toml"),
        dir.path().join("config/local.toml"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("examples")).unwrap();
    for e in std::fs::read_dir(root.join("examples")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join("examples").join(p.file_name().unwrap())).unwrap();
        }
    }
    let o = Command::new(env!("CARGO_BIN_EXE_timport"))
        .args([
            "run",
            "--config",
            "config/local.toml",
            "--until-idle",
            "--ingest",
            "examples",
        ])
        .current_dir(dir.path())
        .env_remove("TIMPORT_CONFIG")
        .env_remove("TIMPORT__TENCENT__SECRET_KEY")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    assert!(out.contains("import finished"), "{out}");
}

/// `base` with `queue.database = db`.
fn base_with_database(dir: &Path, db: &str) -> String {
    base(dir).replace(
        &format!("database = \"{}/q.db\"", dir.display()),
        &format!("database = \"{db}\""),
    )
}

/// [`base_with_database`] as `args` can use it: `verify` reads history back from a server, so it
/// gets one (a closed port) instead of the built-in simulator, and the secret key.
fn config_for(dir: &Path, db: &str, args: &[&str]) -> String {
    let toml = base_with_database(dir, db);
    if args.first() != Some(&"verify") {
        return toml;
    }
    toml.replace(
        "sdkappid = 1400000000\n",
        &format!(
            "sdkappid = 1400000000\nidentifier = \"administrator\"\nsecret_key = \"{SECRET}\"\nbase_url = \"http://127.0.0.1:9\"\n"
        ),
    )
    .replace("[simulator]\nenabled = true", "[simulator]\nenabled = false")
}

/// stdout and stderr together.
fn all_output(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(o))
}

/// Every command that opens the queue, with the job file it may need.
fn queue_commands(dir: &Path) -> Vec<Vec<String>> {
    let job = dir.join("job.ndjson");
    std::fs::write(
        &job,
        "{\"GroupId\":\"g\",\"From_Account\":\"a\",\"SendTime\":1700000000,\"MsgBody\":[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"x\"}}]}\n",
    )
    .unwrap();
    [
        vec!["run", "--until-idle"],
        vec!["status"],
        vec!["status", "--json"],
        vec!["ingest", job.to_str().unwrap()],
        vec!["verify"],
        vec!["retry", "--all"],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect()
}

#[test]
fn a_database_url_of_another_kind_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        format!("mysql://timport:{SECRET}@127.0.0.1:3306/queue"),
        "sqlite://q.db".to_string(),
        "sqlite:///var/lib/timport/q.db".to_string(),
        "http://example.com/queue".to_string(),
    ] {
        for args in queue_commands(dir.path()) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = run_with(dir.path(), &config_for(dir.path(), &url, &args), &args);
            assert_config_error(&o, "queue.database");
            assert!(!all_output(&o).contains(SECRET), "{url} {args:?}");
        }
        // Nothing was taken for a file path either.
        assert!(
            !dir.path().join("q.db").exists() && !dir.path().join("sqlite:").exists(),
            "{url}: a file was made"
        );
    }
}

/// Runs every `(toml, args)` at once (each its own config file in `dir`), as `run_with` does,
/// and returns their outputs in order. A command still running after 60 s is killed (its output
/// so far returned, its status then not a success).
fn run_all(dir: &Path, runs: &[(String, Vec<String>)]) -> Vec<Output> {
    let children: Vec<std::process::Child> = runs
        .iter()
        .enumerate()
        .map(|(i, (toml, args))| {
            let file = dir.join(format!("t{i}.toml"));
            std::fs::write(&file, toml).unwrap();
            Command::new(env!("CARGO_BIN_EXE_timport"))
                .args(args)
                .arg("--config")
                .arg(&file)
                .current_dir(dir)
                .env_remove("TIMPORT_CONFIG")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let started = std::time::Instant::now();
    children
        .into_iter()
        .map(|mut c| {
            while c.try_wait().unwrap().is_none()
                && started.elapsed() < std::time::Duration::from_secs(60)
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = c.kill();
            c.wait_with_output().unwrap()
        })
        .collect()
}

#[test]
fn a_postgres_password_is_never_shown_even_when_the_server_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let mut runs = Vec::new();
    for url in [
        format!("postgres://timport:{SECRET}@127.0.0.1:1/queue"),
        format!("postgresql://timport@127.0.0.1:1/queue?password={SECRET}&sslmode=disable"),
    ] {
        for args in queue_commands(dir.path()) {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            runs.push((config_for(dir.path(), &url, &a), args));
        }
    }
    for ((_, args), o) in runs.iter().zip(run_all(dir.path(), &runs)) {
        let all = all_output(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {all}");
        assert!(!all.contains(SECRET), "{args:?} shows the password: {all}");
        assert!(
            all.contains("127.0.0.1:1"),
            "{args:?}: the host is named: {all}"
        );
    }
}

#[test]
fn a_relative_path_containing_a_colon_stays_a_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.ndjson");
    std::fs::write(
        &job,
        "{\"GroupId\":\"g\",\"From_Account\":\"a\",\"SendTime\":1700000000,\"MsgBody\":[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"x\"}}]}\n",
    )
    .unwrap();
    for (db, file) in [
        ("q:1.db", "q:1.db"),
        ("data:v2/queue.db", "data:v2/queue.db"),
    ] {
        let o = run_with(
            dir.path(),
            &base_with_database(dir.path(), db),
            &["ingest", job.to_str().unwrap()],
        );
        assert_eq!(o.status.code(), Some(0), "{db}: {}", all_output(&o));
        assert!(dir.path().join(file).is_file(), "{db}: the file is there");
        let o = run_with(
            dir.path(),
            &base_with_database(dir.path(), db),
            &["status", "--json"],
        );
        assert_eq!(o.status.code(), Some(0), "{db}: {}", all_output(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["totals"]["pending"], 1, "{db}: {v}");
    }
}

#[tokio::test]
async fn a_postgres_password_is_never_shown_by_a_server_that_answers() {
    // Needs the PostgreSQL server of TIMPORT_TEST_DATABASE_URL (trust auth: the password given is
    // not checked, only carried).
    let Some(backend) = common::Backend::postgres_or_skip(
        "config_errors::a_postgres_password_is_never_shown_by_a_server_that_answers",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let with_password = |url: &str| {
        let mut u = url::Url::parse(url).unwrap();
        u.set_password(Some(SECRET)).unwrap();
        u.to_string()
    };
    // A database that does not exist: status and verify exit 2, never showing the password.
    let missing = with_password(&common::missing_database(backend, dir.path()));
    let runs: Vec<(String, Vec<String>)> = ["status", "verify"]
        .iter()
        .map(|a| (config_for(dir.path(), &missing, &[a]), vec![a.to_string()]))
        .collect();
    for ((_, args), o) in runs.iter().zip(run_all(dir.path(), &runs)) {
        let all = all_output(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {all}");
        assert!(!all.contains(SECRET), "{args:?} shows the password: {all}");
    }
    // A real queue: no command shows the password (one after another: they share the queue).
    let db = common::TestDb::new(backend, dir.path()).await;
    let url = with_password(&db.config_value());
    for args in queue_commands(dir.path()) {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let toml = config_for(dir.path(), &url, &a);
        let o = run_all(dir.path(), &[(toml, args.clone())]).remove(0);
        let all = all_output(&o);
        assert!(!all.contains(SECRET), "{args:?} shows the password: {all}");
        assert_ne!(o.status.code(), Some(2), "{args:?}: {all}");
    }
}
