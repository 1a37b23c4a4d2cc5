//! PostgreSQL: what `timport status` and `timport verify` read and record, and the dropping of
//! imported bodies (`queue.keep_bodies`).

use super::PgStore;
use crate::store::*;

impl PgStore {
    pub async fn totals(&self, _group: Option<&str>) -> Result<Totals, StoreError> {
        Err(self.todo("totals"))
    }

    pub async fn lanes(
        &self,
        _group: Option<&str>,
        _limit: i64,
    ) -> Result<Vec<LaneStatus>, StoreError> {
        Err(self.todo("lanes"))
    }

    pub async fn blocked_lanes(&self, _limit: i64) -> Result<Vec<LaneStatus>, StoreError> {
        Err(self.todo("blocked_lanes"))
    }

    pub async fn jobs(&self, _limit: i64) -> Result<Vec<JobStatus>, StoreError> {
        Err(self.todo("jobs"))
    }

    pub async fn failure_reasons(
        &self,
        _group: Option<&str>,
        _limit: i64,
    ) -> Result<Vec<FailureReason>, StoreError> {
        Err(self.todo("failure_reasons"))
    }

    pub async fn verify_scope(
        &self,
        _group: Option<&str>,
        _job: Option<i64>,
    ) -> Result<Vec<VerifyLane>, StoreError> {
        Err(self.todo("verify_scope"))
    }

    pub async fn verify_begin_lane(
        &self,
        _lane_id: i64,
        _imported: i64,
        _top_seq: Option<i64>,
        _low_seq: i64,
    ) -> Result<(), StoreError> {
        Err(self.todo("verify_begin_lane"))
    }

    pub async fn verify_reset(
        &self,
        _group: Option<&str>,
        _job: Option<i64>,
    ) -> Result<(), StoreError> {
        Err(self.todo("verify_reset"))
    }

    pub async fn verify_ours(
        &self,
        _lane_id: i64,
        _lo: i64,
        _hi: i64,
    ) -> Result<Vec<VerifyOurs>, StoreError> {
        Err(self.todo("verify_ours"))
    }

    pub async fn verify_lookalikes(
        &self,
        _lane_id: i64,
        _from: &str,
        _time: i64,
    ) -> Result<Vec<(VerifyOurs, bool)>, StoreError> {
        Err(self.todo("verify_lookalikes"))
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn verify_record(
        &self,
        _lane_id: i64,
        _lo: i64,
        _hi: i64,
        _rows: &[VerifyRow],
        _top_seq: Option<i64>,
        _next_seq: i64,
        _done: bool,
    ) -> Result<(), StoreError> {
        Err(self.todo("verify_record"))
    }

    pub async fn verify_counts(
        &self,
        _group: Option<&str>,
        _job: Option<i64>,
    ) -> Result<Vec<VerifyCounts>, StoreError> {
        Err(self.todo("verify_counts"))
    }

    pub async fn verify_problems(
        &self,
        _group: Option<&str>,
        _job: Option<i64>,
        _limit: i64,
    ) -> Result<Vec<VerifyProblemRow>, StoreError> {
        Err(self.todo("verify_problems"))
    }

    pub async fn verify_claim(
        &self,
        _token: &str,
        _rate: f64,
        _now_ms: i64,
    ) -> Result<(), StoreError> {
        Err(self.todo("verify_claim"))
    }

    pub async fn verify_heartbeat(&self, _token: &str, _now_ms: i64) -> Result<bool, StoreError> {
        Err(self.todo("verify_heartbeat"))
    }

    pub async fn verify_release(&self, _token: &str) -> Result<(), StoreError> {
        Err(self.todo("verify_release"))
    }

    pub async fn verify_claim_read(&self) -> Result<Option<VerifyClaim>, StoreError> {
        Err(self.todo("verify_claim_read"))
    }

    pub async fn verify_ack(
        &self,
        _token: &str,
        _now_ms: i64,
        _ceiling: f64,
    ) -> Result<(), StoreError> {
        Err(self.todo("verify_ack"))
    }

    pub async fn bodies_to_drop(
        &self,
        _keep: crate::settings::KeepBodies,
        _now: i64,
        _limit: i64,
    ) -> Result<BodiesToDrop, StoreError> {
        Err(self.todo("bodies_to_drop"))
    }

    pub async fn drop_bodies(
        &self,
        _digests: &[(i64, String)],
        _cursor: Option<i64>,
    ) -> Result<u64, StoreError> {
        Err(self.todo("drop_bodies"))
    }
}
