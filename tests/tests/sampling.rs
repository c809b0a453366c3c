//! Head sampling with the standard OTEL_TRACES_SAMPLER variables.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    agent::{Agent, Export},
    free_port,
    programs::{run, Nginx},
    receiver::Receiver,
};

#[test]
fn traceidratio_keeps_about_a_quarter_and_counts_the_rest() {
    let rx = Receiver::start();
    let port = free_port();
    let nginx = Nginx::start(port, "    location = /hello { return 200 \"hello\\n\"; }\n");
    let agent = Agent::start_env(
        Export::Grpc(&rx),
        &["--exe", "*/nginx"],
        &[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ],
    );
    run(Command::new("hey")
        .args([
            "-n",
            "400",
            "-c",
            "4",
            &format!("http://127.0.0.1:{port}/hello"),
        ])
        .stdout(Stdio::null()));
    std::thread::sleep(Duration::from_millis(1500));
    let (_, err) = agent.stop();
    let served = nginx.access_log_lines() as u64;
    let kept = rx.spans().len() as u64;
    let counters = tests::agent::final_counters(&err);
    let unsampled = counters.get("spans_unsampled").copied().unwrap_or(0);
    println!("sampling 0.25: kept {kept} of {served}");
    assert_eq!(served, 400);
    // Binomial(400, 0.25): mean 100, sd 8.7; this window is about 4.5 sd wide on each side.
    assert!(
        (60..=140).contains(&kept),
        "kept {kept} of 400 at ratio 0.25"
    );
    assert_eq!(
        kept + unsampled,
        served,
        "every request is either kept or counted as unsampled"
    );
    // Kept spans are the sampled ones: their trace ids pass the same ratio test.
    assert!(rx.spans().iter().all(|s| s.span.flags & 1 == 1));
}

#[test]
fn garbage_sampler_is_refused_clearly() {
    tests::require_root();
    let out = Command::new(tests::agent::agent_bin())
        .env("OTEL_TRACES_SAMPLER", "sometimes")
        .output()
        .expect("agent");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OTEL_TRACES_SAMPLER=\"sometimes\""));
}
