//! `peer config show` prints the effective configuration: defaults, then the
//! TOML file, then `PEER_*` variables, then flags.

use std::process::Command;

fn show(dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_peer"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .args(["config", "show"])
        .envs(env.iter().copied())
        .output()
        .expect("run peer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn file_env_and_flags_layer_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let defaults = show(dir.path(), &[], &[]);
    assert!(
        defaults.contains("max_envelope_size = 1048576"),
        "{defaults}"
    );
    assert!(
        defaults.contains("timestamp_tolerance_secs = 60"),
        "{defaults}"
    );
    assert!(
        defaults.contains("listen = \"127.0.0.1:7401\""),
        "{defaults}"
    );

    std::fs::write(
        dir.path().join("config.toml"),
        "[protocol]\nmax_envelope_size = 65536\nreplay_capacity = 10\n",
    )
    .expect("write config");
    let from_file = show(dir.path(), &[], &[]);
    assert!(
        from_file.contains("max_envelope_size = 65536"),
        "{from_file}"
    );

    let env = [("PEER_PROTOCOL__MAX_ENVELOPE_SIZE", "131072")];
    let from_env = show(dir.path(), &env, &[]);
    assert!(
        from_env.contains("max_envelope_size = 131072"),
        "{from_env}"
    );
    assert!(
        from_env.contains("replay_capacity = 10"),
        "the file still applies: {from_env}"
    );
}

#[test]
fn a_bad_value_is_an_error_that_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_peer"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["config", "show"])
        .env("PEER_PROTOCOL__MAX_ENVELOPE_SIZE", "lots")
        .output()
        .expect("run peer");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MAX_ENVELOPE_SIZE"), "{err}");
}

#[test]
fn peer_bootstrap_lists_bootstrap_addresses_and_a_bad_one_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = "/ip4/192.0.2.1/tcp/7400";
    let b = "/ip4/192.0.2.2/tcp/7400";
    let shown = show(dir.path(), &[("PEER_BOOTSTRAP", &format!("{a}, {b}"))], &[]);
    let flat: String = shown.split_whitespace().collect();
    assert!(
        flat.contains(&format!("bootstrap=[\"{a}\",\"{b}\",]")),
        "{shown}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_peer"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["config", "show"])
        .env("PEER_BOOTSTRAP", "not-an-address")
        .output()
        .expect("run peer");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PEER_BOOTSTRAP") && err.contains("not-an-address"),
        "{err}"
    );
}
