//! The control socket as a user reaches it: endpoints named by PCI address wherever it takes
//! one, and the PCI addresses beside the IDs its replies give.

mod common;

use common::*;
use serde_json::{json, Value};
use virtio::Status;

/// pci-testdev at 00:05.0.
const EP: u32 = 0x28;

#[test]
fn the_control_socket_takes_endpoints_as_the_command_line_does() {
    let d = Daemon::start(&["--endpoints", "00:05.0,0001:02:03.4"]);
    let mut dev = d.connect();
    assert_eq!(status_of(&mut dev, &attach(1, EP)), Status::Ok);
    assert_eq!(
        status_of(&mut dev, &map(1, 0x1000, 0x1fff, 0x8000)),
        Status::Ok
    );
    let r = d.control(json!({"cmd": "use_dma_api", "endpoint": "00:05.0"}));
    assert_eq!(r, json!({"ok": true, "endpoint": EP, "bdf": "00:05.0"}));
    for endpoint in [
        json!("00:05.0"),
        json!("0000:00:05.0"),
        json!("0x28"),
        json!("40"),
        json!(40),
    ] {
        let r = d.control(json!({"cmd": "translate", "endpoint": endpoint, "iova": 0x1008}));
        assert_eq!(r["gpa"], 0x8008, "{endpoint}: {r}");
        assert_eq!((&r["endpoint"], &r["bdf"]), (&json!(EP), &json!("00:05.0")));
    }
    // A segment other than 0: ID = segment << 16 | requester ID.
    let r = d.control(json!({"cmd": "claim", "endpoint": "0001:02:03.4", "cookie": 1}));
    assert_eq!(r["ok"], true, "{r}");
    let r =
        d.control(json!({"cmd": "translate", "endpoint": "0001:02:03.4", "iova": 0, "owner": 1}));
    assert_eq!(r["fault"], "no_domain", "{r}");
    assert_eq!(
        (&r["endpoint"], &r["bdf"]),
        (&json!(0x1_021c), &json!("0001:02:03.4"))
    );
    let groups = d.control(json!({"cmd": "groups"}));
    let bdfs: Vec<&Value> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| &g["bdfs"])
        .collect();
    assert_eq!(bdfs, [&json!(["00:05.0"]), &json!(["0001:02:03.4"])]);
    assert_eq!(groups["groups"][0]["attached_bdfs"], json!(["00:05.0"]));

    for (endpoint, says) in [
        (
            json!("00:20.0"),
            "endpoint: invalid PCI address \"00:20.0\"",
        ),
        (json!("zz"), "endpoint: invalid endpoint \"zz\""),
        (
            json!(0x1_0000_0000u64),
            "endpoint: not a 32-bit endpoint ID",
        ),
        (json!(-1), "endpoint: not a 32-bit endpoint ID"),
        (
            json!([40]),
            "endpoint: expected an endpoint ID or a PCI address",
        ),
    ] {
        let r = d.control(json!({"cmd": "translate", "endpoint": endpoint, "iova": 0}));
        assert_eq!(r["ok"], false, "{endpoint}: {r}");
        let error = r["error"].as_str().unwrap();
        assert!(error.starts_with(says), "{endpoint}: {error}");
    }
    let r = d.control(json!({"cmd": "translate", "iova": 0}));
    assert_eq!(r["error"], "missing \"endpoint\"");
}
