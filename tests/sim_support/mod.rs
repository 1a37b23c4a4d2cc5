//! Shared helpers for the client and simulator tests: a simulator on 127.0.0.1:0 and a real
//! client pointed at it.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::SecretString;
use serde_json::{Value, json};
use timport::simulator::{self, SimConfig, SimHandle};
use timport::tencent::{ClientConfig, ImportGroupMsgRequest, ImportMsg, TencentClient};

pub const APP: u64 = 1_400_000_001;
pub const ADMIN: &str = "administrator";
pub const KEY: &str = "sim-secret-key-5bd2850fff3ecb11";
/// CreateTime of the test groups.
pub const CREATED: i64 = 1_600_000_000;

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

pub fn sim_config() -> SimConfig {
    let mut cfg = SimConfig::new(APP, ADMIN, SecretString::from(KEY.to_owned()));
    cfg.groups = vec![("g1".into(), Some(CREATED)), ("g2".into(), Some(CREATED))];
    cfg
}

pub async fn sim_with(f: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut cfg = sim_config();
    f(&mut cfg);
    simulator::start(cfg).await.expect("simulator starts")
}

pub async fn sim() -> SimHandle {
    sim_with(|_| {}).await
}

pub fn client_config(sim: &SimHandle) -> ClientConfig {
    let mut cfg = ClientConfig::new(APP, ADMIN, SecretString::from(KEY.to_owned()));
    cfg.base_url = Some(sim.base_url());
    cfg.request_timeout = Duration::from_secs(10);
    cfg
}

pub fn client(sim: &SimHandle) -> TencentClient {
    TencentClient::new(client_config(sim), None).expect("client builds")
}

pub fn client_with(sim: &SimHandle, f: impl FnOnce(&mut ClientConfig)) -> TencentClient {
    let mut cfg = client_config(sim);
    f(&mut cfg);
    TencentClient::new(cfg, None).expect("client builds")
}

pub fn text(s: &str) -> Value {
    json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": s}}])
}

/// A MsgBody value as the raw text a request carries.
pub fn raw(v: &Value) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(v).expect("a value serializes")
}

pub fn msg(from: &str, send_time: i64, random: u32) -> ImportMsg {
    ImportMsg {
        from_account: from.into(),
        send_time,
        random: Some(random),
        msg_body: raw(&text(&format!("{from} at {send_time}"))),
    }
}

pub fn import(group: &str, msgs: Vec<ImportMsg>) -> ImportGroupMsgRequest {
    ImportGroupMsgRequest {
        group_id: group.into(),
        topic_id: None,
        recent_contact_flag: None,
        msg_list: msgs,
    }
}
