//! Runtimes beyond C and Python: Node's libuv server and client, and Go's net/http client (hey).
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    agent::{Agent, Export},
    fixture, free_port,
    programs::{run, Proc},
    receiver::Receiver,
    wait_port,
};

#[test]
fn node_server_node_and_go_clients() {
    let rx = Receiver::start();
    let port = free_port();
    let _server = Proc::spawn(
        Command::new("node")
            .arg(fixture("node_server.js"))
            .arg(port.to_string())
            .env("OTEL_SERVICE_NAME", "node-api")
            .stdout(Stdio::null()),
    );
    wait_port(port);
    let agent = Agent::start(Export::Grpc(&rx), &["--port", &port.to_string()]);
    run(Command::new("node")
        .arg(fixture("node_client.js"))
        .arg(port.to_string()));
    run(Command::new("hey")
        .args(["-n", "3", "-c", "1", &format!("http://127.0.0.1:{port}/go")])
        .stdout(Stdio::null()));
    let servers = rx.wait_for(9, Duration::from_secs(20), "server spans", |s| {
        s.kind() == "server"
    });
    let clients = rx.wait_for(9, Duration::from_secs(20), "client spans", |s| {
        s.kind() == "client"
    });
    std::thread::sleep(Duration::from_millis(800));
    agent.stop();
    assert_eq!(
        rx.spans().len(),
        18,
        "one server and one client span per request"
    );
    assert!(servers
        .iter()
        .all(|s| s.res("service.name") == Some("node-api")));
    let errors = servers
        .iter()
        .filter(|s| s.attr("url.path") == Some("/err"))
        .collect::<Vec<_>>();
    assert_eq!(errors.len(), 2);
    assert!(errors
        .iter()
        .all(|s| s.status_code() == 2 && s.attr("http.response.status_code") == Some("500")));
    let posts = servers
        .iter()
        .filter(|s| s.attr("http.request.method") == Some("POST"))
        .count();
    assert_eq!(
        posts, 3,
        "5000-byte bodies beyond the payload prefix are skipped, not mistaken for requests"
    );
    let node_clients = clients
        .iter()
        .filter(|c| c.res("process.executable.name") == Some("node"))
        .count();
    let go_clients = clients
        .iter()
        .filter(|c| c.res("service.name") == Some("hey"))
        .count();
    assert_eq!((node_clients, go_clients), (6, 3));
    assert!(clients
        .iter()
        .filter(|c| c.res("service.name") == Some("hey"))
        .all(|c| c.attr("url.path") == Some("/go")));
}
