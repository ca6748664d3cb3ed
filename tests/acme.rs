//! The production default, `tls_mode=acme`, proven against a real ACME
//! server: each proxy gets its certificates from Pebble (Debian trixie's, in
//! the tools root), which validates the challenges for real over the stack's
//! own port 80 (or 443). Pebble runs in the stack's network namespace as
//! `https://pebble:14000/dir`, the `acme_directory` site value; the name
//! `pebble` is in the stack's /etc/hosts like the Matrix host's.
//!
//! Pebble's own HTTPS listener gets a certificate from a throwaway CA made
//! here (Debian's package ships its example config but not the test
//! certificates it names), and the appliance trusts that CA the documented
//! way: a `*.pem` in /var/lib/matrix/proxy/acme-ca/. Certificates Pebble
//! issues chain to a root it makes at each start, fetched from its
//! management interface; curl trusts only that root when it checks what the
//! proxy serves.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::stack::{boot, server_names, Stack};
use common::tools::ToolsRoot;
use common::*;

const DIRECTORY: &str = "https://pebble:14000/dir";
/// The test's own files (Pebble's config and listener certificate, the
/// lego wrapper, Pebble's root), bound here in every command of the stack.
const TEST_DIR: &str = "/opt/acme-test";
const LISTENER_CA: &str = "/opt/acme-test/listener-ca.pem";
const ROOT: &str = "/opt/acme-test/pebble-root.pem";

/// The appliance runs lego from its image through podman; here the same
/// binary, unpacked from the locally built image (what the default `vps`
/// embeds), runs in the stack's namespace through this wrapper, which logs
/// every call.
const LEGO_WRAPPER: &str = r#"#!/bin/sh
echo "$*" >>/opt/acme-test/lego-calls.log
exec /opt/acme-test/lego-image/rootfs/usr/bin/lego "$@"
"#;

/// A CA for Pebble's HTTPS listener and its certificate for `pebble`; the
/// config is the Debian package's example with these files, and its
/// challenge ports set to the real ones (80 for HTTP-01, 443 for
/// TLS-ALPN-01).
fn write_pebble_files(stack: &Stack, dir: &Path, proxy: &str) {
    let script = format!(
        "set -e\ncd {TEST_DIR}\n\
         openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc \
           -keyout listener-ca.key -out listener-ca.pem -days 2 \
           -subj '/CN=Test CA of the Pebble ACME listener' \
           -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null\n\
         openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out listener.key\n\
         openssl req -x509 -new -key listener.key -out listener.crt -days 2 \
           -CA listener-ca.pem -CAkey listener-ca.key -subj /CN=pebble \
           -addext subjectAltName=DNS:pebble,IP:127.0.0.1 \
           -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth 2>/dev/null\n"
    );
    stack.run("sh", &["-c", &script]);
    let example = ToolsRoot::get()
        .root
        .join("usr/share/doc/pebble/examples/pebble-config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&example).unwrap()).unwrap();
    let pebble = &mut config["pebble"];
    pebble["certificate"] = format!("{TEST_DIR}/listener.crt").into();
    pebble["privateKey"] = format!("{TEST_DIR}/listener.key").into();
    pebble["httpPort"] = 80.into();
    pebble["tlsPort"] = 443.into();
    if proxy == "caddy" {
        // Pebble sends Retry-After as seconds or, at random, as an HTTP date;
        // Debian's Caddy 2.6.2 (acmez 1.0.4) takes only seconds and fails
        // the order on a date. The image's Caddy 2.11 takes both. Without
        // Retry-After, clients poll at their own pace.
        pebble["retryAfter"] = serde_json::json!({"authz": 0, "order": 0});
    }
    fs::write(dir.join("pebble-config.json"), config.to_string()).unwrap();
}

/// Files that hold the proxy's certificates, by path, with their bytes.
fn certificate_files(stack: &Stack, proxy: &str) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.insert(path.clone(), fs::read(&path).unwrap());
            }
        }
    }
    let sub = match proxy {
        "nginx" => "proxy/tls",
        "caddy" => "proxy/caddy/certificates",
        _ => "proxy/traefik",
    };
    let mut files = BTreeMap::new();
    walk(&stack.state.join(sub), &mut files);
    assert!(!files.is_empty(), "no certificate files under {sub}");
    files
}

/// The issuer of the certificate the proxy serves for `host` (SNI) on 443.
fn served_issuer(stack: &Stack, host: &str) -> String {
    let o = stack.run(
        "sh",
        &[
            "-c",
            &format!(
                "openssl s_client -connect 127.0.0.1:443 -servername {host} </dev/null 2>/dev/null | openssl x509 -noout -issuer"
            ),
        ],
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn obtains_certificates_by_acme(proxy: &str) {
    let started = Instant::now();
    // nginx's ACME client is lego from its locally built image; the other
    // proxies have their own (the stack runs their programs from the tools
    // root), so no image is built for them.
    let project = if proxy == "nginx" {
        Project::with_shared_image_cache()
    } else {
        Project::copy_of_repo()
    };
    let server_name = server_names().0;
    let matrix_host = format!("matrix.{server_name}");
    let mut values = vec![
        ("server_name", server_name.as_str()),
        ("proxy", proxy),
        ("tls_mode", "acme"),
        ("acme_directory", DIRECTORY),
    ];
    if proxy == "nginx" {
        values.extend([("pull_images", "true"), ("lego_image_source", "local")]);
    }
    let mut stack = boot(&project, &values);
    let booted = started.elapsed();
    stack.names = vec![server_name.clone(), matrix_host.clone(), "pebble".into()];
    stack.write_hosts(&[]);
    let dir = stack.dir.path().join("acme-test");
    fs::create_dir(&dir).unwrap();
    stack.extra_binds.push((dir.clone(), TEST_DIR.into()));
    if proxy == "nginx" {
        common::images::unpack(
            &stack.rendered,
            "localhost/matrix-appliance/lego:embedded",
            &dir.join("lego-image"),
        );
        let wrapper = dir.join("lego");
        fs::write(&wrapper, LEGO_WRAPPER).unwrap();
        fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
    }

    // Pebble, validating for real: no PEBBLE_VA_ALWAYS_VALID. NOSLEEP drops
    // its random wait before validating; NONCEREJECT=0 its deliberate
    // rejection of 5% of nonces (clients retry, but tests need no dice).
    write_pebble_files(&stack, &dir, proxy);
    stack.spawn(
        "pebble",
        &[],
        &[("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "0")],
        "pebble",
        &["-config", &format!("{TEST_DIR}/pebble-config.json")],
    );
    stack.wait_for(
        "Pebble",
        Duration::from_secs(20),
        "curl",
        &[
            "-fsS",
            "--cacert",
            LISTENER_CA,
            "-o",
            "/dev/null",
            DIRECTORY,
        ],
    );
    // The ACME clients trust Pebble's listener through the appliance's
    // acme-ca directory (SSL_CERT_DIR for Caddy and Traefik,
    // LEGO_CA_CERTIFICATES for lego).
    fs::copy(
        dir.join("listener-ca.pem"),
        stack.state.join("proxy/acme-ca/pebble-listener-ca.pem"),
    )
    .unwrap();

    // The proxy as systemd starts it, then its certificate unit (which
    // waits for Caddy's or Traefik's own ACME, or runs lego for nginx).
    stack.start_proxy_containers();
    stack.wait_for(
        "the proxy on port 80",
        Duration::from_secs(60),
        "curl",
        &["-sS", "-o", "/dev/null", &format!("http://{matrix_host}/")],
    );
    // matrix-proxy.service's ExecReload= for nginx (podman kill --signal HUP).
    let reload = format!("kill -HUP {}", stack.pid("matrix-proxy"));
    let lego = format!("{TEST_DIR}/lego");
    let env = [
        ("MATRIX_LEGO", lego.as_str()),
        ("MATRIX_PROXY_RELOAD", reload.as_str()),
        ("MATRIX_PROXY_CERTS_WAIT", "60"),
    ];
    let first = stack.run_unit("matrix-proxy-certs.service", &env);
    let first_out = String::from_utf8_lossy(&first.stdout).into_owned();
    let obtained = started.elapsed();

    // What the proxy serves for each name chains to Pebble's root of this
    // run, the only CA curl trusts here; Synapse answers through it.
    stack.run(
        "curl",
        &[
            "-fsS",
            "--cacert",
            LISTENER_CA,
            "-o",
            ROOT,
            "https://pebble:15000/roots/0",
        ],
    );
    let versions_url = format!("https://{matrix_host}/_matrix/client/versions");
    stack.wait_for(
        "the proxy serving Pebble's certificate",
        Duration::from_secs(30),
        "curl",
        &["-fsS", "--cacert", ROOT, "-o", "/dev/null", &versions_url],
    );
    let versions = stack.http(&["--cacert", ROOT], &versions_url);
    assert_eq!(versions.status, 200, "{versions:?}");
    assert!(versions.json()["versions"].is_array(), "{versions:?}");
    let server = stack.http(
        &["--cacert", ROOT],
        &format!("https://{server_name}/.well-known/matrix/server"),
    );
    assert_eq!(server.status, 200, "{server:?}");
    assert_eq!(server.json()["m.server"], format!("{matrix_host}:443"));
    for host in [&matrix_host, &server_name] {
        let issuer = served_issuer(&stack, host);
        assert!(
            issuer.contains("Pebble Intermediate CA"),
            "{host}: served certificate issued by {issuer:?}"
        );
    }

    // Pebble validated each name itself, over the proxy's ports.
    let log = stack.log("pebble");
    assert!(
        !log.contains("Skipping real validation"),
        "Pebble skipped validation:\n{log}"
    );
    for host in [&matrix_host, &server_name] {
        let task = format!("Value:\"{host}\"");
        assert!(
            log.lines()
                .any(|l| l.contains("Pulled a task") && l.contains(&task)),
            "Pebble never validated {host}:\n{log}"
        );
        // lego (nginx) and Traefik use HTTP-01 only; Caddy picks HTTP-01 or
        // TLS-ALPN-01, and says which in its log (Pebble logs a URL for
        // HTTP-01 only).
        let http =
            format!("Attempting to validate w/ HTTP: http://{host}:80/.well-known/acme-challenge/");
        let how = if proxy == "caddy" {
            caddy_challenge(&stack.log("matrix-proxy"), host)
        } else {
            "http-01".to_string()
        };
        match how.as_str() {
            "http-01" => assert!(
                log.contains(&http),
                "Pebble did not validate {host} over HTTP:\n{log}"
            ),
            "tls-alpn-01" => assert!(
                !log.contains(&http),
                "Caddy says TLS-ALPN-01 for {host}, Pebble validated over HTTP:\n{log}"
            ),
            other => panic!("{host}: unexpected challenge type {other:?}"),
        }
        eprintln!("{proxy}: Pebble validated {host} by {how}");
    }
    let validations = log.matches("set VALID by completed challenge").count();
    assert!(
        validations >= 2,
        "{validations} valid authorizations:\n{log}"
    );

    // A second run of the unit changes nothing: the certificates are in
    // place and not due (for nginx: lego is not even called).
    let before = certificate_files(&stack, proxy);
    let calls = fs::read_to_string(dir.join("lego-calls.log")).unwrap_or_default();
    let second = stack.run_unit("matrix-proxy-certs.service", &env);
    let second_out = String::from_utf8_lossy(&second.stdout).into_owned();
    assert_eq!(
        certificate_files(&stack, proxy),
        before,
        "the second run changed certificates:\n{second_out}"
    );
    if proxy == "nginx" {
        assert_eq!(
            calls.lines().count(),
            2,
            "lego calls:\n{calls}\n{first_out}"
        );
        assert_eq!(
            fs::read_to_string(dir.join("lego-calls.log")).unwrap(),
            calls,
            "the second run called lego:\n{second_out}"
        );
        assert!(
            second_out.contains(&format!("{matrix_host}: ACME certificate valid until"))
                && second_out.contains("nothing to do"),
            "{second_out}"
        );
        assert_eq!(
            fs::read(stack.state.join("proxy/tls/matrix-host.crt")).unwrap(),
            fs::read(
                stack
                    .state
                    .join(format!("proxy/acme/certificates/{matrix_host}.crt"))
            )
            .unwrap()
        );
    }
    eprintln!(
        "{proxy}: booted in {booted:?}, certificates after {obtained:?}, done in {:?}\n{first_out}",
        started.elapsed()
    );
}

#[test]
fn nginx_obtains_certificates_from_pebble_with_lego() {
    obtains_certificates_by_acme("nginx");
}

#[test]
fn caddy_obtains_certificates_from_pebble() {
    obtains_certificates_by_acme("caddy");
}

#[test]
fn traefik_obtains_certificates_from_pebble() {
    obtains_certificates_by_acme("traefik");
}

/// The challenge type Caddy solved for `host`, from its JSON log: the last
/// "trying to solve challenge" for the host before "certificate obtained
/// successfully" for it.
fn caddy_challenge(log: &str, host: &str) -> String {
    let mut tried = None;
    for line in log.lines() {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if entry["identifier"] != host {
            continue;
        }
        match entry["msg"].as_str() {
            Some("trying to solve challenge") => {
                tried = entry["challenge_type"].as_str().map(str::to_string);
            }
            Some("certificate obtained successfully") => {
                return tried.unwrap_or_else(|| {
                    panic!("Caddy obtained {host} without naming a challenge:\n{log}")
                });
            }
            _ => {}
        }
    }
    panic!("Caddy's log has no certificate obtained for {host}:\n{log}")
}
