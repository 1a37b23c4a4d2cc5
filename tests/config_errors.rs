//! Issue 12 point 4, "configuration mistakes are caught at start, exit 2, naming the key": the
//! real binary with mistaken configuration files, and the README's first command still working
//! with the built-in simulator and no credentials.

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
