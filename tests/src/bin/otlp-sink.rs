//! A standalone OTLP receiver for benchmarks: counts spans by `service.name/kind` and serves the
//! counts at `GET /count` on its HTTP port. Usage: `otlp-sink GRPC_PORT HTTP_PORT`.
use tests::receiver::{Options, Receiver};

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u16>().expect("port number"));
    let (grpc_port, http_port) = (args.next().unwrap_or(4317), args.next().unwrap_or(4318));
    let r = Receiver::start_with(Options {
        grpc_port,
        http_port,
        count_only: true,
        ..Options::default()
    });
    println!("otlp-sink grpc={} http={}", r.grpc, r.http);
    loop {
        std::thread::park();
    }
}
