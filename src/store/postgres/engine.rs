//! PostgreSQL: what the engine claims and records (lanes, messages, accounts, groups and
//! members), and `timport retry`.

use super::PgStore;
use crate::store::*;

impl PgStore {
    pub async fn runnable_lanes(&self, _now_ms: i64, _limit: i64) -> Result<Vec<Lane>, StoreError> {
        Err(self.todo("runnable_lanes"))
    }

    pub async fn next_retry_at(&self) -> Result<Option<i64>, StoreError> {
        Err(self.todo("next_retry_at"))
    }

    pub async fn lane(&self, _id: i64) -> Result<Lane, StoreError> {
        Err(self.todo("lane"))
    }

    pub async fn in_flight(&self, _lane_id: i64) -> Result<Vec<QueuedMessage>, StoreError> {
        Err(self.todo("in_flight"))
    }

    pub async fn pending_upto(
        &self,
        _lane_id: i64,
        _upto: i64,
        _limit: i64,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        Err(self.todo("pending_upto"))
    }

    pub async fn pending_span(
        &self,
        _lane_id: i64,
        _checked_id: i64,
        _upto: i64,
    ) -> Result<(Option<i64>, i64, bool), StoreError> {
        Err(self.todo("pending_span"))
    }

    pub async fn claim_batch(
        &self,
        _lane: &Lane,
        _max: usize,
        _cut_at_tie: bool,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        Err(self.todo("claim_batch"))
    }

    pub async fn record(
        &self,
        _lane_id: i64,
        _updates: &[MessageUpdate],
        _lane: &LaneUpdate,
    ) -> Result<(), StoreError> {
        Err(self.todo("record"))
    }

    pub async fn record_many(
        &self,
        _records: &[Record],
    ) -> Result<Vec<Vec<QueuedMessage>>, StoreError> {
        Err(self.todo("record_many"))
    }

    pub async fn retry(&self, _scope: RetryScope<'_>) -> Result<(u64, u64), StoreError> {
        Err(self.todo("retry"))
    }

    pub async fn pending_accounts(
        &self,
        _profile: bool,
        _limit: i64,
    ) -> Result<Vec<PendingAccount>, StoreError> {
        Err(self.todo("pending_accounts"))
    }

    pub async fn account_states(
        &self,
        _ids: &[&str],
    ) -> Result<HashMap<String, AccountState>, StoreError> {
        Err(self.todo("account_states"))
    }

    pub async fn record_accounts(
        &self,
        _imported: &[&str],
        _failed: &[(&str, String)],
    ) -> Result<(), StoreError> {
        Err(self.todo("record_accounts"))
    }

    pub async fn accounts_pending(&self) -> Result<bool, StoreError> {
        Err(self.todo("accounts_pending"))
    }

    pub async fn account_totals(&self) -> Result<AccountTotals, StoreError> {
        Err(self.todo("account_totals"))
    }

    pub async fn retry_accounts(&self) -> Result<AccountRetry, StoreError> {
        Err(self.todo("retry_accounts"))
    }

    pub async fn groups_to_create(
        &self,
        _now_ms: i64,
        _limit: i64,
    ) -> Result<Vec<GroupToCreate>, StoreError> {
        Err(self.todo("groups_to_create"))
    }

    pub async fn count_create_attempt(&self, _group: &str) -> Result<(), StoreError> {
        Err(self.todo("count_create_attempt"))
    }

    pub async fn group_created(&self, _group: &str, _note: Option<&str>) -> Result<(), StoreError> {
        Err(self.todo("group_created"))
    }

    pub async fn group_blocked(
        &self,
        _group: &str,
        _code: Option<i64>,
        _reason: &str,
    ) -> Result<(), StoreError> {
        Err(self.todo("group_blocked"))
    }

    pub async fn group_retry_at(
        &self,
        _group: &str,
        _retry_at_ms: i64,
        _why: &str,
    ) -> Result<(), StoreError> {
        Err(self.todo("group_retry_at"))
    }

    pub async fn groups_with_member_work(
        &self,
        _now_ms: i64,
        _limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        Err(self.todo("groups_with_member_work"))
    }

    pub async fn group_work_left(&self) -> Result<bool, StoreError> {
        Err(self.todo("group_work_left"))
    }

    pub async fn pending_members(
        &self,
        _group: &str,
        _limit: i64,
    ) -> Result<Vec<MemberRow>, StoreError> {
        Err(self.todo("pending_members"))
    }

    pub async fn pending_unread(
        &self,
        _group: &str,
        _limit: i64,
    ) -> Result<Vec<MemberRow>, StoreError> {
        Err(self.todo("pending_unread"))
    }

    pub async fn record_members(&self, _updates: &[MemberUpdate]) -> Result<(), StoreError> {
        Err(self.todo("record_members"))
    }

    pub async fn member_totals(&self, _group: Option<&str>) -> Result<MemberTotals, StoreError> {
        Err(self.todo("member_totals"))
    }
}
