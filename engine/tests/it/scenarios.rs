//! The load-test scenarios in their short form (seconds each), against the real binary:
//! steady, burst, slow, failing, outage and SIGKILL-and-restart all lose nothing.

use herald_load_tests::scenario::{run, Options, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_in_short_form_loses_nothing() {
    let opts = Options { herald: env!("CARGO_BIN_EXE_herald").into(), short: true, ..Options::default() };
    for s in Scenario::ALL {
        let r = run(s, &opts, None).await.unwrap();
        eprintln!("{}", herald_load_tests::report::table(std::slice::from_ref(&r)));
        assert!(r.events_accepted > 0, "{}: nothing was published", r.scenario);
        assert_eq!(
            r.lost,
            0,
            "{}: {} of {} deliveries lost; Herald said:\n{}",
            r.scenario,
            r.lost,
            r.deliveries_expected,
            r.diagnosis.as_deref().unwrap_or_default()
        );
        assert_eq!(r.bad_signatures, 0, "{}: bad signatures", r.scenario);
        match s {
            Scenario::Failing => assert!(r.failures_sent > 0, "the failing sink failed some requests"),
            Scenario::Outage => assert!(r.failures_sent > 0, "the outage refused some requests"),
            _ => {}
        }
        assert!(!r.timeline.is_empty() && r.latency_ms.max >= r.latency_ms.p50);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_injection_suite_in_short_form_loses_nothing() {
    use herald_load_tests::chaos::{run, summary, Chaos};
    let opts = Options { herald: env!("CARGO_BIN_EXE_herald").into(), short: true, ..Options::default() };
    let chaos = Chaos {
        duration: std::time::Duration::from_secs(15),
        rate: 200,
        every_ms: (1000, 2500),
        segment_bytes: 64 * 1024,
        seed: 20261130,
    };
    let r = run(&opts, &chaos).await.unwrap();
    eprintln!("{}", summary(&r));
    assert!(r.kills >= 2, "Herald was killed during the run: {r:?}");
    assert!(r.events > 1000, "events flowed: {r:?}");
    assert_eq!(r.lost, 0, "{r:?}");
    assert_eq!(r.bad_signatures, 0);
}
