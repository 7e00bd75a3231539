//! Configuration loading: the file's text, then environment overrides, one `NAME=value` a line after a NUL
//! byte. Never a panic; a configuration it accepts prints (secrets redacted) and parses again without one.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (file, env) = text.split_once('\0').unwrap_or((text, ""));
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // A `*_file` key names a file to read: keep the fuzzer to names that cannot block or never end.
    if file.contains("/dev/")
        || file.contains("/proc/")
        || env.iter().any(|(_, v)| v.contains("/dev/") || v.contains("/proc/"))
    {
        return;
    }
    if let Ok(cfg) = delta_bridge::config::Config::parse(file, Path::new("fuzz.toml"), &env) {
        let shown = cfg.redacted_toml();
        let _ = delta_bridge::config::Config::parse(&shown, Path::new("fuzz.toml"), &env);
    }
});
