//! URL redaction on arbitrary request targets: never panics, and a secret-looking query value
//! or userinfo password never survives into `url.full`.
#![no_main]
use agent::span::redact::UrlPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let policy = UrlPolicy::default();
    let full = policy.full_url(target, "example.com:80", "http");
    let secret = "s3cr3tV4lue";
    let pair = format!("token={secret}");
    let has_secret_pair = target
        .split_once('?')
        .is_some_and(|(_, q)| q.split('&').any(|kv| kv == pair));
    if has_secret_pair && !target.contains('#') && target.matches(secret).count() == 1 {
        assert!(!full.contains(secret), "{target:?} -> {full:?}");
    }
});
