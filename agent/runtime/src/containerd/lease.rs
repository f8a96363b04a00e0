//! Leases keep containerd's GC away from work in progress (blobs not yet referenced by an image,
//! snapshots not yet owned by a container).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::{
    CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
};
use rand::Rng as _;

use super::{Containerd, ContainerdError};

/// A lease held for one pull or one container creation. It carries a `gc.expire` label, so a
/// crashed agent's lease does not pin data forever; `Containerd::release` ends it.
#[derive(Debug)]
pub struct Lease {
    id: String,
}

impl Lease {
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Containerd {
    pub async fn create_lease(
        &self,
        purpose: &str,
        ttl: Duration,
    ) -> Result<Lease, ContainerdError> {
        let suffix: u64 = rand::rng().random();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let id = format!("berth-{purpose}-{}-{suffix:016x}", now.as_nanos());
        let expire = SystemTime::now() + ttl;
        let mut labels = HashMap::new();
        labels.insert("containerd.io/gc.expire".to_owned(), rfc3339(expire));
        self.leases()
            .create(self.request(
                CreateLeaseRequest {
                    id: id.clone(),
                    labels,
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("leases.create"))?;
        Ok(Lease { id })
    }

    /// Ends a lease; what it protected is collected at containerd's next GC unless something
    /// else references it.
    pub async fn release(&self, lease: Lease) -> Result<(), ContainerdError> {
        self.delete_lease(lease, false).await
    }

    /// Ends the lease of failed work and waits for containerd's GC to collect what only it held,
    /// so the failure leaves no snapshot or blob behind. (containerd 1.6 may otherwise wait for
    /// a hundred more mutations before it collects.)
    pub async fn release_and_collect(&self, lease: Lease) -> Result<(), ContainerdError> {
        self.delete_lease(lease, true).await
    }

    async fn delete_lease(&self, lease: Lease, sync: bool) -> Result<(), ContainerdError> {
        let result = self
            .leases()
            .delete(self.request(DeleteLeaseRequest { id: lease.id, sync }, None))
            .await
            .map_err(ContainerdError::rpc("leases.delete"));
        super::ignore_not_found(result)
    }
}

/// RFC 3339 UTC with seconds, as containerd's `gc.expire` label wants.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's algorithm.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_957_679);
        assert_eq!(rfc3339(t), "2026-11-29T13:07:59Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }
}
