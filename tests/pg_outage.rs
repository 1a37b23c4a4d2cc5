//! Issue 15 point 4: the PostgreSQL connection lost while the engine imports. A TCP proxy stands
//! between the store and the server; cutting it drops every open connection and refuses new ones
//! (a network cut, a server restart), restoring it lets them through again. The lanes must pause
//! (the store's health says why, once) and go on when the database is back, with the simulator's
//! history exactly the messages queued, in order, none twice.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use timport::engine::EngineExit;
use timport::settings::Database;
use timport::simulator::Faults;
use timport::store::{Health, Store, StoreOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const GROUPS: [&str; 3] = ["pg-o1", "pg-o2", "pg-o3"];
const PER_GROUP: i64 = 60;

/// A loopback TCP proxy to `upstream` that can be cut and restored.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<tokio::sync::Mutex<JoinSet<()>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
        let (up2, conns2) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(client); // refused, as by a server that is down
                    continue;
                }
                let upstream = upstream.clone();
                conns2.lock().await.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy { port, up, conns }
    }

    async fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.conns.lock().await.abort_all();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_pauses_the_lanes_and_nothing_is_lost_or_sent_twice() {
    let Ok(server) = std::env::var("TIMPORT_TEST_DATABASE_URL") else {
        assert!(
            std::env::var("TIMPORT_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "TIMPORT_REQUIRE_POSTGRES=1 but TIMPORT_TEST_DATABASE_URL is not set"
        );
        eprintln!("skipped: TIMPORT_TEST_DATABASE_URL is not set");
        return;
    };
    // A database of its own, reached through the proxy.
    let name = format!(
        "outage_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&server).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await
            .unwrap();
    }
    let u = url::Url::parse(&server).unwrap();
    let upstream = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(5432));
    let proxy = Proxy::start(upstream).await;
    let mut via = u.clone();
    via.set_port(Some(proxy.port)).unwrap();
    via.set_path(&format!("/{name}"));
    // Trust authentication ignores it; it must never be shown.
    via.set_password(Some("hunter2")).unwrap();
    let store = Store::open(&Database::from(via.to_string()), &StoreOptions::default())
        .await
        .unwrap();

    let env = Env::new().await;
    let queued: Vec<(String, String, i64, String)> = GROUPS
        .iter()
        .flat_map(|g| {
            (0..PER_GROUP).map(move |i| {
                (
                    g.to_string(),
                    format!("u{}", i % 3),
                    T0 + i,
                    format!("{g}-m{i}"),
                )
            })
        })
        .collect();
    let text: String = queued
        .iter()
        .map(|(g, f, t, b)| line(g, f, *t, b) + "\n")
        .collect();
    let p = env.write("a.ndjson", &text);
    timport::intake::files::ingest_file(
        Some(&store),
        &p,
        true,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();

    let mut cfg = sim_config();
    cfg.groups = GROUPS.iter().map(|g| ((*g).to_string(), None)).collect();
    cfg.faults = Faults {
        latency: Duration::from_millis(60),
        ..Faults::default()
    };
    let sim = start_sim(cfg).await;
    let client = client_for(&sim, 20);
    let mut health = store.subscribe_health();
    let engine = {
        let store = store.clone();
        tokio::spawn(async move { run_until_idle(&store, client, engine_config()).await })
    };

    let total = |sim: &timport::simulator::SimHandle| -> usize {
        GROUPS.iter().map(|g| history_texts(sim, g).len()).sum()
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        while total(&sim) < 20 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the import never started");

    // The cut: every connection dropped, new ones refused, for longer than a pool acquire waits.
    proxy.cut().await;
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Health::WritesRefused { cause, .. } = health.borrow_and_update().clone() {
                return cause;
            }
            health.changed().await.unwrap();
        }
    })
    .await
    .expect("the store never noticed the lost connection");
    assert!(refused.contains("connection lost"), "{refused}");
    assert!(
        !refused.contains("hunter2") && refused.contains("***"),
        "names the URL redacted only: {refused}"
    );
    let during = total(&sim);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Requests already out may land, but the lanes claim nothing new while the database is away.
    assert!(
        total(&sim) <= during + 7 * engine_config().max_lanes,
        "lanes went on sending without a database"
    );
    proxy.restore();

    let exit = tokio::time::timeout(Duration::from_secs(120), engine)
        .await
        .expect("the import did not finish after the database came back")
        .unwrap()
        .unwrap();
    assert!(matches!(exit, EngineExit::Idle(_)), "{exit:?}");
    assert_eq!(store.health(), Health::Ok);
    for g in GROUPS {
        let expected: Vec<(String, i64, String)> = queued
            .iter()
            .filter(|(qg, ..)| qg == g)
            .map(|(_, f, t, b)| (f.clone(), *t, b.clone()))
            .collect();
        assert_eq!(history_texts(&sim, g), expected, "group {g}");
    }
    let t = store.totals(None).await.unwrap();
    assert_eq!(
        (t.imported, t.pending, t.in_flight, t.failed),
        (180, 0, 0, 0)
    );
    store.close().await;
}
