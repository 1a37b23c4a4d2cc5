//! Typed request and response bodies of the group import endpoints, with Tencent's field names.
//!
//! Role: shared by the client (to send and parse) and the simulator (to parse and answer).
//! Responses tolerate unknown fields and missing optional ones, so a new field on Tencent's side
//! never breaks parsing. Stopping and recovery: plain data, no state.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// `import_group_msg` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportGroupMsgRequest {
    #[serde(rename = "GroupId")]
    pub group_id: String,
    /// Topic of a topic-enabled Community (top level, as the official SDKs send it).
    #[serde(rename = "TopicId", default, skip_serializing_if = "Option::is_none")]
    pub topic_id: Option<String>,
    /// 1 = update recent contacts.
    #[serde(
        rename = "RecentContactFlag",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub recent_contact_flag: Option<u8>,
    /// At most 7 messages.
    #[serde(rename = "MsgList")]
    pub msg_list: Vec<ImportMsg>,
}

/// One message of an import.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportMsg {
    #[serde(rename = "From_Account")]
    pub from_account: String,
    /// Unix seconds.
    #[serde(rename = "SendTime")]
    pub send_time: i64,
    #[serde(rename = "Random", default, skip_serializing_if = "Option::is_none")]
    pub random: Option<u32>,
    /// Array of `{MsgType, MsgContent}` elements, as JSON text: serialized as it is, byte for
    /// byte (the queued, minified text of the caller's body), never rebuilt from a parsed value.
    #[serde(rename = "MsgBody")]
    pub msg_body: Box<RawValue>,
}

/// `import_group_msg` response body (envelope fields are handled by the client).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImportGroupMsgResponse {
    #[serde(rename = "ImportMsgResult", default)]
    pub import_msg_result: Option<Vec<ImportMsgResult>>,
}

/// Per-message outcome: `Result` 0 = imported; 10004 = SendTime invalid; 80002 = too long;
/// 80001 = restricted words. Not guaranteed to be index-aligned with `MsgList`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportMsgResult {
    #[serde(rename = "Result")]
    pub result: i64,
    #[serde(rename = "MsgSeq", default, skip_serializing_if = "Option::is_none")]
    pub msg_seq: Option<u64>,
    #[serde(rename = "MsgTime", default, skip_serializing_if = "Option::is_none")]
    pub msg_time: Option<i64>,
}

/// `group_msg_get_simple` request: newest first, `ReqMsgNumber` ≤ 20, Seq ≤ `ReqMsgSeq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMsgGetSimpleRequest {
    #[serde(rename = "GroupId")]
    pub group_id: String,
    #[serde(rename = "ReqMsgNumber")]
    pub req_msg_number: u32,
    #[serde(rename = "ReqMsgSeq", default, skip_serializing_if = "Option::is_none")]
    pub req_msg_seq: Option<u64>,
    #[serde(rename = "TopicId", default, skip_serializing_if = "Option::is_none")]
    pub topic_id: Option<String>,
    #[serde(
        rename = "WithRecalledMsg",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub with_recalled_msg: Option<u8>,
}

/// `group_msg_get_simple` response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupMsgGetSimpleResponse {
    #[serde(rename = "GroupId", default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// 1 = everything returned; 0 = more to page; 2 = truncated and the rest expired.
    #[serde(rename = "IsFinished", default)]
    pub is_finished: i64,
    #[serde(rename = "RspMsgList", default)]
    pub rsp_msg_list: Vec<RspMsg>,
}

/// One message read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RspMsg {
    #[serde(rename = "From_Account", default)]
    pub from_account: String,
    /// 1 = hole (expired, failed or deleted; empty body), 2 = recalled.
    #[serde(rename = "IsPlaceMsg", default)]
    pub is_place_msg: i64,
    #[serde(
        rename = "IsSystemMsg",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub is_system_msg: Option<i64>,
    #[serde(
        rename = "MsgPriority",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub msg_priority: Option<i64>,
    /// Signed on purpose: see [`RspMsg::random_u32`].
    #[serde(rename = "MsgRandom", default)]
    pub msg_random: i64,
    #[serde(rename = "MsgSeq")]
    pub msg_seq: u64,
    #[serde(rename = "MsgTimeStamp", default)]
    pub msg_time_stamp: i64,
    #[serde(rename = "MsgBody", default)]
    pub msg_body: Value,
}

impl RspMsg {
    /// `MsgRandom` as the u32 that was sent. Tolerates a server that reports the value as a
    /// signed 32-bit integer (negative for values ≥ 2^31). `None` when out of both ranges.
    pub fn random_u32(&self) -> Option<u32> {
        u32::try_from(self.msg_random)
            .ok()
            .or_else(|| i32::try_from(self.msg_random).ok().map(|v| v as u32))
    }
}

/// `get_group_info` request (≤ 50 groups).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetGroupInfoRequest {
    #[serde(rename = "GroupIdList")]
    pub group_id_list: Vec<String>,
    #[serde(
        rename = "ResponseFilter",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub response_filter: Option<Value>,
}

/// `get_group_info` response. Only the per-group `ErrorCode` is meaningful.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetGroupInfoResponse {
    #[serde(rename = "GroupInfo", default)]
    pub group_info: Vec<GroupInfo>,
}

/// One group's details, with its own error code (10010 = does not exist).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupInfo {
    #[serde(rename = "GroupId", default)]
    pub group_id: String,
    #[serde(rename = "ErrorCode", default)]
    pub error_code: i64,
    #[serde(rename = "ErrorInfo", default)]
    pub error_info: String,
    #[serde(rename = "Type", default, skip_serializing_if = "Option::is_none")]
    pub group_type: Option<String>,
    #[serde(rename = "Name", default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(
        rename = "Owner_Account",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub owner_account: Option<String>,
    #[serde(
        rename = "CreateTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub create_time: Option<i64>,
    #[serde(
        rename = "LastInfoTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub last_info_time: Option<i64>,
    /// Time of the newest message: the floor for the next SendTime.
    #[serde(
        rename = "LastMsgTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub last_msg_time: Option<i64>,
    /// Seq the next message will get; `NextMsgSeq - 1` is the newest.
    #[serde(
        rename = "NextMsgSeq",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub next_msg_seq: Option<u64>,
    #[serde(rename = "MemberNum", default, skip_serializing_if = "Option::is_none")]
    pub member_num: Option<u64>,
    #[serde(
        rename = "MaxMemberNum",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_member_num: Option<u64>,
}

/// `{Key, Value}` of `AppDefinedData`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppDefinedData {
    #[serde(rename = "Key")]
    pub key: String,
    #[serde(rename = "Value")]
    pub value: String,
}

/// `import_group` request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImportGroupRequest {
    #[serde(
        rename = "Owner_Account",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub owner_account: Option<String>,
    /// Private (Work), Public, ChatRoom (Meeting) or Community.
    #[serde(rename = "Type")]
    pub group_type: String,
    #[serde(rename = "GroupId", default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(
        rename = "Introduction",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub introduction: Option<String>,
    #[serde(
        rename = "Notification",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub notification: Option<String>,
    #[serde(rename = "FaceUrl", default, skip_serializing_if = "Option::is_none")]
    pub face_url: Option<String>,
    #[serde(
        rename = "MaxMemberCount",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_member_count: Option<u32>,
    #[serde(
        rename = "ApplyJoinOption",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub apply_join_option: Option<String>,
    #[serde(
        rename = "AppDefinedData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub app_defined_data: Option<Vec<AppDefinedData>>,
    /// Unix seconds; defaults to the request time on the server.
    #[serde(
        rename = "CreateTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub create_time: Option<i64>,
    /// Community only: 1 = topics enabled.
    #[serde(
        rename = "SupportTopic",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub support_topic: Option<u8>,
}

/// `import_group` response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImportGroupResponse {
    #[serde(rename = "GroupId", default)]
    pub group_id: String,
}

/// `import_group_member` request (≤ 300 members).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportGroupMemberRequest {
    #[serde(rename = "GroupId")]
    pub group_id: String,
    #[serde(rename = "MemberList")]
    pub member_list: Vec<ImportMember>,
}

/// One member to import.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportMember {
    #[serde(rename = "Member_Account")]
    pub member_account: String,
    /// Only "Admin" is accepted.
    #[serde(rename = "Role", default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Must be after the group's CreateTime and before now.
    #[serde(rename = "JoinTime", default, skip_serializing_if = "Option::is_none")]
    pub join_time: Option<i64>,
    #[serde(
        rename = "UnreadMsgNum",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub unread_msg_num: Option<u64>,
}

/// `import_group_member` response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImportGroupMemberResponse {
    #[serde(rename = "MemberList", default)]
    pub member_list: Vec<ImportMemberResult>,
}

/// `Result`: 0 failed, 1 added, 2 already a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportMemberResult {
    #[serde(rename = "Member_Account")]
    pub member_account: String,
    #[serde(rename = "Result")]
    pub result: i64,
}

/// `set_unread_msg_num` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetUnreadMsgNumRequest {
    #[serde(rename = "GroupId")]
    pub group_id: String,
    #[serde(rename = "Member_Account")]
    pub member_account: String,
    #[serde(rename = "UnreadMsgNum")]
    pub unread_msg_num: u64,
}

/// `set_unread_msg_num` has no body fields beyond the envelope.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SetUnreadMsgNumResponse {}

/// `multiaccount_import` request (service `im_open_login_svc`), at most 100 accounts. IDs alone
/// go in the old form, which leaves an existing account's profile as it is; accounts with profile
/// data in the new form, which sets (and overwrites) Nick and FaceUrl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MultiaccountImportRequest {
    Ids {
        #[serde(rename = "Accounts")]
        accounts: Vec<String>,
    },
    Profiles {
        #[serde(rename = "AccountList")]
        account_list: Vec<AccountItem>,
    },
}

/// One account of the `AccountList` form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountItem {
    #[serde(rename = "UserID")]
    pub user_id: String,
    #[serde(rename = "Nick", default, skip_serializing_if = "Option::is_none")]
    pub nick: Option<String>,
    #[serde(rename = "FaceUrl", default, skip_serializing_if = "Option::is_none")]
    pub face_url: Option<String>,
}

/// `multiaccount_import` response: the accounts that could not be imported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MultiaccountImportResponse {
    #[serde(rename = "FailAccounts", default)]
    pub fail_accounts: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_signed_tolerance() {
        let mut m: RspMsg = serde_json::from_value(serde_json::json!({
            "MsgSeq": 1, "MsgRandom": -1, "Unknown": true
        }))
        .expect("parses");
        assert_eq!(m.random_u32(), Some(u32::MAX));
        m.msg_random = 4_000_000_000;
        assert_eq!(m.random_u32(), Some(4_000_000_000));
        m.msg_random = 1 << 40;
        assert_eq!(m.random_u32(), None);
    }
}
