//! The gRPC surface and the CLI against a real agent: errors, health, reflection, the live
//! table, counters, and the `tcp-trace` binary's own output.
mod support;

use std::{
    io::{Read, Write},
    sync::Arc,
    time::Duration,
};

use support::{
    NetNs,
    agent::{TestAgent, collect, netns_filter},
    roundtrips,
};
use tcp_trace::proto;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_filters_get_invalid_argument_naming_the_bad_part_and_the_agent_keeps_serving() {
    let mut agent = TestAgent::start().await;
    let bad = [
        (
            proto::Filter {
                ports: vec![0],
                ..Default::default()
            },
            "filter.ports[0]",
        ),
        (
            proto::Filter {
                addresses: vec!["198.51.100.0/40".into()],
                ..Default::default()
            },
            "filter.addresses[0]",
        ),
        (
            proto::Filter {
                kinds: vec![42],
                ..Default::default()
            },
            "filter.kinds[0]",
        ),
        (
            proto::Filter {
                netns: vec![0],
                ..Default::default()
            },
            "filter.netns[0]",
        ),
    ];
    for (filter, names) in bad {
        let request = proto::SubscribeRequest {
            filter: Some(filter.clone()),
            queue: 0,
            ..Default::default()
        };
        let status = agent.client.subscribe(request).await.expect_err("rejected");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(names), "{}", status.message());
        let request = proto::ListConnectionsRequest {
            filter: Some(filter),
            ..Default::default()
        };
        let status = agent
            .client
            .list_connections(request)
            .await
            .expect_err("rejected");
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    assert_eq!(
        agent.stats().await.subscribers,
        0,
        "rejected requests hold nothing"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_health_and_reflection_services_answer() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let agent = TestAgent::start().await;
    let channel = tcp_trace::client::channel(&agent.addr).await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let request = HealthCheckRequest {
        service: "tcptrace.v1.TcpTrace".into(),
    };
    let response = health.check(request).await.unwrap().into_inner();
    assert_eq!(response.status, ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("a list of services")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"tcptrace.v1.TcpTrace"), "{names:?}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_connections_shows_a_live_connection_with_its_owner_and_stats_add_up() {
    let ns = Arc::new(NetNs::new("live"));
    let mut agent = TestAgent::start().await;
    let mut stream = agent.subscribe(netns_filter(ns.inode())).await;
    // Hold one connection open while the agent is asked.
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let held_ns = Arc::clone(&ns);
    let holder = std::thread::spawn(move || {
        held_ns.run(move || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (mut server, _) = listener.accept().unwrap();
            client.write_all(b"x").unwrap();
            server.read_exact(&mut [0u8; 1]).unwrap();
            ready_tx
                .send((client.local_addr().unwrap(), listener.local_addr().unwrap()))
                .unwrap();
            hold_rx.recv().unwrap();
        })
    });
    let (client_addr, server_addr) = ready_rx.recv().unwrap();
    // CLOSE->LISTEN, CLOSE->SYN_SENT, SYN_SENT->ESTABLISHED, LISTEN->SYN_RECV, SYN_RECV->ESTABLISHED
    collect(
        &mut stream,
        5,
        Duration::from_secs(10),
        Duration::from_millis(50),
    )
    .await;
    let request = proto::ListConnectionsRequest {
        filter: Some(netns_filter(ns.inode())),
        ..Default::default()
    };
    let conns = agent
        .client
        .list_connections(request)
        .await
        .unwrap()
        .into_inner()
        .connections;
    assert_eq!(
        conns.len(),
        3,
        "listener, client and server side: {conns:#?}"
    );
    let client = conns
        .iter()
        .find(|c| support::agent::endpoint(&c.local) == client_addr)
        .unwrap();
    assert_eq!(client.state, proto::TcpState::Established as i32);
    assert_eq!(client.direction, proto::Direction::Active as i32);
    assert_eq!(support::agent::endpoint(&client.remote), server_addr);
    let owner = client.owner.as_ref().unwrap();
    assert_eq!(
        (owner.pid, owner.attribution),
        (
            std::process::id(),
            proto::Attribution::ProcessContext as i32
        )
    );
    // A port filter on the table.
    let by_port = proto::Filter {
        ports: vec![u32::from(client_addr.port())],
        netns: vec![ns.inode()],
        ..Default::default()
    };
    let request = proto::ListConnectionsRequest {
        filter: Some(by_port),
        ..Default::default()
    };
    assert_eq!(
        agent
            .client
            .list_connections(request)
            .await
            .unwrap()
            .into_inner()
            .connections
            .len(),
        2
    );

    hold_tx.send(()).unwrap();
    holder.join().unwrap();
    let stats = agent.stats().await;
    assert!(stats.kernel_records >= 5 && stats.records_decoded <= stats.kernel_records);
    assert_eq!(stats.kernel_ring_full, 0);
    assert_eq!(stats.records_malformed, 0);
    assert_eq!(stats.ends_missed, 0, "no connection's CLOSE went missing");
    assert_eq!(stats.subscribers, 1);
    // The BTF tracepoint where the kernel takes it, else the classic one.
    assert!(
        stats
            .hooks_attached
            .iter()
            .any(|hook| hook.ends_with(":inet_sock_set_state")),
        "{:?}",
        stats.hooks_attached
    );
    assert!(stats.hooks_missing.is_empty(), "{:?}", stats.hooks_missing);
    agent.shutdown().await;
}

/// The binary's clients, end to end: `watch --json` prints proto3 JSON, one event per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_watches_as_json_lists_connections_and_shows_stats() {
    let ns = Arc::new(NetNs::new("cli"));
    let agent = TestAgent::start().await;
    let connect = agent.addr.to_string();
    let netns = ns.inode().to_string();
    let watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_tcp-trace"))
        .args([
            "watch",
            "--json",
            "--connect",
            &connect,
            "--netns",
            &netns,
            "--count",
            "15",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The subscription must exist before the traffic: wait until the agent counts it.
    let mut client = agent.client.clone();
    for _ in 0..100 {
        if client
            .get_stats(proto::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner()
            .subscribers
            == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let traffic_ns = Arc::clone(&ns);
    tokio::task::spawn_blocking(move || roundtrips(&traffic_ns, "127.0.0.1".parse().unwrap(), 1))
        .await
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(10), watch.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
        .collect();
    assert_eq!(lines.len(), 15);
    assert_eq!(lines[0]["stateChange"]["newState"], "TCP_STATE_LISTEN");
    assert_eq!(
        lines[0]["connection"]["netns"], netns,
        "uint64 is a JSON string"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["connectionClosed"]["path"][1] == "TCP_STATE_SYN_SENT")
    );

    let run = support::agent::cli;
    let stats = run(&["stats", "--connect", &connect]);
    assert!(stats.contains("kernel ring full (lost)"), "{stats}");
    let stats: serde_json::Value =
        serde_json::from_str(&run(&["stats", "--json", "--connect", &connect])).unwrap();
    assert!(!stats["hooksAttached"].as_array().unwrap().is_empty());
    let conns = run(&["conns", "--connect", &connect, "--netns", &netns]);
    assert!(conns.ends_with("0 connections\n"), "{conns}");

    // A client pointed at nothing says so in one line.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tcp-trace"))
        .args(["stats", "--connect", "unix:/nonexistent/tcp-trace.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("tcp-trace: cannot reach the agent at unix:/nonexistent/tcp-trace.sock"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_streams_and_removes_the_socket_file() {
    let mut agent = TestAgent::start().await;
    let mut stream = agent.subscribe(proto::Filter::default()).await;
    let tcp_trace::api::ListenAddr::Unix(path) = agent.addr.clone() else {
        unreachable!()
    };
    assert!(path.exists());
    tokio::time::timeout(Duration::from_secs(10), agent.shutdown())
        .await
        .expect("shutdown does not wait on streams");
    assert!(!path.exists());
    // The stream ends (or errors) instead of hanging.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("stream ends")
    {}
}
