//! Tests of policy: second rounding, quota days and a plan's extension and size checks.

use std::time::Duration;

use super::*;
use crate::error::ceil_secs;

#[test]
fn rounding_and_days() {
    assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
    assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
    assert_eq!(ceil_secs(Duration::ZERO), 1);
    assert_eq!(quota_day(86_400_000 + 1000), (1, 86_399));
}

#[test]
fn extension_allowlist() {
    let config: PlanConfig =
        serde_norway::from_str("max_file_size: 10\nallowed_extensions: [PNG, txt, \"\"]").unwrap();
    let plan = Plan::new("p", &config);
    assert!(plan.check_extension("png").is_ok());
    assert!(plan.check_extension("").is_ok());
    assert_eq!(
        plan.check_extension("exe"),
        Err(ApiError::UnsupportedType {
            extension: "exe".into()
        })
    );
    assert!(plan.check_size(10).is_ok());
    assert_eq!(plan.check_size(11), Err(ApiError::TooLarge { limit: 10 }));
}
