//! Userspace pipeline throughput: recorded kernel ring items (one keep-alive HTTP/1.1 exchange
//! as nginx and curl produce it: request read, response head and body written) replayed through
//! decode -> HTTP/1.x parser -> span builder -> OTLP encoding. Reports events/s and spans/s on
//! one core.
use std::{hint::black_box, sync::Arc};

use agent::{
    export::encode,
    pipeline::event::{endpoints, KernelEvent},
    process::Resource,
    protocol::{http1::Http1Conn, Dir, Segment},
    span::{build_span, redact::UrlPolicy, KeyValue, Value},
    trace_context::link::{decide, Decision, Registry},
};
use agent_common::{
    ConnTuple, DataHeader, DATA_HEADER_SIZE, DIR_EGRESS, DIR_INGRESS, EVENT_DATA, ROLE_SERVER,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const REQUEST: &[u8] = b"GET /api/v1/items/42?expand=true HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 21 Nov 2026 18:00:00 GMT\r\nContent-Type: application/json\r\nContent-Length: 27\r\nConnection: keep-alive\r\n\r\n";
const RESPONSE_BODY: &[u8] = b"{\"id\":42,\"name\":\"example\"}\n";

/// A ring item as the kernel writes it.
fn item(direction: u32, payload: &[u8], ts: u64) -> Vec<u8> {
    let mut t = ConnTuple {
        local_port: 8080,
        peer_port: 51234,
        family: 2,
        ..ConnTuple::default()
    };
    t.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    t.peer_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    let h = DataHeader {
        kind: EVENT_DATA,
        direction,
        pid: 1234,
        tid: 1234,
        fd: 7,
        captured: payload.len() as u32,
        sk: 0xffff_8880_1234_5678,
        len: payload.len() as u64,
        ts_enter: ts,
        ts_exit: ts + 1_000,
        role: ROLE_SERVER,
        layout: agent_common::LAYOUT_PREFIX,
        tuple: t,
        comm: *b"nginx\0\0\0\0\0\0\0\0\0\0\0",
        wire: Default::default(),
        lost: 0,
    };
    let mut v = vec![0u8; DATA_HEADER_SIZE];
    // SAFETY: DataHeader is plain old data of exactly DATA_HEADER_SIZE bytes.
    unsafe { std::ptr::write_unaligned(v.as_mut_ptr().cast::<DataHeader>(), h) };
    v.extend_from_slice(payload);
    v
}

fn bench(c: &mut Criterion) {
    const EXCHANGES: u64 = 256;
    let mut items = Vec::new();
    for i in 0..EXCHANGES {
        let ts = i * 100_000;
        items.push(item(DIR_INGRESS, REQUEST, ts));
        items.push(item(DIR_EGRESS, RESPONSE_HEAD, ts + 50_000));
        items.push(item(DIR_EGRESS, RESPONSE_BODY, ts + 60_000));
    }
    let urls = UrlPolicy::default();
    let resource = Arc::new(Resource {
        service_name: "nginx".into(),
        attributes: vec![
            KeyValue::new("service.name", Value::Str("nginx".into())),
            KeyValue::new("process.pid", Value::Int(1234)),
            KeyValue::new("host.name", Value::Str("bench".into())),
        ],
    });
    let sampler = agent::sampling::Sampler::default();
    let registry = Registry::default();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(items.len() as u64));
    group.bench_function("events", |b| {
        b.iter(|| {
            let mut conn = Http1Conn::default();
            let mut exchanges = Vec::new();
            let mut spans = Vec::with_capacity(EXCHANGES as usize);
            let mut arena = bytes::BytesMut::new();
            for raw in &items {
                let Ok(KernelEvent::Data { header, payload }) =
                    KernelEvent::decode_in(raw, &mut arena)
                else {
                    panic!("decode")
                };
                let dir = if header.direction == DIR_INGRESS {
                    Dir::Ingress
                } else {
                    Dir::Egress
                };
                let seg = Segment {
                    data: &payload,
                    len: header.len,
                    start_ns: header.ts_exit,
                    end_ns: header.ts_exit,
                    ctx: None,
                };
                conn.feed(dir, seg, &mut exchanges);
                let ends = endpoints(&header.tuple);
                for ex in exchanges.drain(..) {
                    if let Decision::Sampled(ids) = decide(&ex, 1, &registry, &sampler) {
                        spans.push(*build_span(&ex, &ends, resource.clone(), ids, &urls, |t| {
                            t + 1_700_000_000_000_000_000
                        }));
                    }
                }
            }
            assert_eq!(spans.len(), EXCHANGES as usize);
            black_box(encode::requests(&spans, usize::MAX))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
