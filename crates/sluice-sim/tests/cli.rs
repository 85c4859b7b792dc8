//! The `sluice sim` flags: validation, and refusing non-loopback hosts.

use sluice_sim::cli::{run, SimArgs};
use sluice_sim::FaultKind;

#[tokio::test]
async fn non_loopback_is_refused_without_allow_remote() {
    for host in ["0.0.0.0", "192.0.2.1", "::"] {
        let args = SimArgs {
            host: host.into(),
            port: 0,
            ..Default::default()
        };
        let err = run(args).await.unwrap_err().to_string();
        assert!(err.contains("--allow-remote"), "{err}");
    }
    let args = SimArgs {
        host: "0.0.0.0".into(),
        allow_remote: true,
        ..Default::default()
    };
    assert!(args.bind_addr().is_ok());
    for host in ["127.0.0.1", "localhost", "::1", "[::1]"] {
        let args = SimArgs {
            host: host.into(),
            ..Default::default()
        };
        assert!(args.bind_addr().unwrap().ip().is_loopback(), "{host}");
    }
}

#[test]
fn flags_become_config() {
    let args = SimArgs {
        rpm: Some(100),
        latency_ms: 20,
        per_token_ms: 0.5,
        faults: vec!["500=0.1".into(), "hang=0.05".into()],
        output_tokens: "4-8".into(),
        bill_abandoned: true,
        ..Default::default()
    };
    let c = args.to_config().unwrap();
    assert!(c.bill_abandoned);
    assert!(!SimArgs::default().to_config().unwrap().bill_abandoned);
    assert_eq!(c.rpm, Some(100));
    assert_eq!(c.latency, std::time::Duration::from_millis(20));
    assert_eq!(c.per_token_latency, std::time::Duration::from_micros(500));
    assert_eq!(
        c.faults,
        vec![(FaultKind::Http500, 0.1), (FaultKind::Hang, 0.05)]
    );
    assert_eq!(c.output_tokens, (4, 8));
    let with_key = SimArgs {
        api_key: Some("sk-secret-value".into()),
        ..Default::default()
    };
    let debug = format!("{:?}", with_key.to_config().unwrap());
    assert!(
        !debug.contains("sk-secret-value") && debug.contains("redacted"),
        "{debug}"
    );

    for bad in [
        SimArgs {
            faults: vec!["500".into()],
            ..Default::default()
        },
        SimArgs {
            faults: vec!["boom=0.1".into()],
            ..Default::default()
        },
        SimArgs {
            faults: vec!["500=2".into()],
            ..Default::default()
        },
        SimArgs {
            faults: vec!["500=0.7".into(), "502=0.7".into()],
            ..Default::default()
        },
        SimArgs {
            output_tokens: "9-3".into(),
            ..Default::default()
        },
        SimArgs {
            output_tokens: "x".into(),
            ..Default::default()
        },
        SimArgs {
            rpm: Some(0),
            ..Default::default()
        },
        SimArgs {
            burst_seconds: 0.0,
            ..Default::default()
        },
    ] {
        assert!(bad.to_config().is_err(), "{bad:?}");
    }
}
