//! Tests of delivery: retry backoff and how provider errors become client errors.

use super::*;
use crate::config::HumanDuration;

#[test]
fn backoff_grows_is_capped_and_honours_retry_after() {
    let retry = RetryConfig {
        max_attempts: Some(5),
        initial_backoff: HumanDuration(Duration::from_millis(100)),
        max_backoff: HumanDuration(Duration::from_secs(1)),
    };
    for _ in 0..50 {
        let first = backoff(&retry, 1, None);
        assert!(
            first >= Duration::from_millis(50) && first <= Duration::from_millis(100),
            "{first:?}"
        );
        let third = backoff(&retry, 3, None);
        assert!(
            third >= Duration::from_millis(200) && third <= Duration::from_millis(400),
            "{third:?}"
        );
        assert!(backoff(&retry, 30, None) <= Duration::from_secs(1));
        assert_eq!(
            backoff(&retry, 1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }
    // An upstream's Retry-After of u64::MAX seconds is taken for a day, not added to a clock.
    let endless = backoff(&retry, 1, Some(Duration::from_secs(u64::MAX)));
    assert_eq!(endless, MAX_RETRY_AFTER);
    assert!(std::time::Instant::now().checked_add(endless).is_some());
}

#[test]
fn provider_errors_map_to_client_errors() {
    let mut rejected = PluginError::new(ErrorKind::Rejected, "bad file");
    rejected.status = Some(400);
    assert_eq!(
        ApiError::from(&rejected),
        ApiError::UpstreamRejected {
            status: 400,
            reason: "bad file".into()
        }
    );
    rejected.status = Some(401);
    assert_eq!(
        ApiError::from(&rejected),
        ApiError::UpstreamRejected {
            status: 502,
            reason: "bad file".into()
        }
    );
    assert_eq!(
        ApiError::from(&PluginError::new(ErrorKind::Timeout, "slow")),
        ApiError::UpstreamTimeout
    );
    assert_eq!(
        ApiError::from(&PluginError::new(ErrorKind::Panic, "x")),
        ApiError::UpstreamFailed("x".into())
    );
    // No delivery slot in time: the gateway's capacity, a 503 to come back after.
    let busy = ApiError::from(&PluginError {
        retry_after_secs: Some(5),
        ..PluginError::new(ErrorKind::Busy, "no slot")
    });
    assert_eq!(busy, ApiError::DeliveryBusy { retry_after_secs: 5 });
    assert_eq!((busy.status().as_u16(), busy.retry_after_secs()), (503, Some(5)));
}
