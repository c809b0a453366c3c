//! A tokio service (multi-thread runtime, hyper server, reqwest client with its own connection
//! pool): every request awaits a 2 ms sleep, then calls the next service without forwarding any
//! header. Nothing here knows about tracing. GET /<id> answers "tokio[<what NEXT/<id> said>]".
//! With `background`, a task spawned before any request also calls NEXT/bg/<k> every few
//! milliseconds through the same client (its pool shared with the handlers): work no request
//! caused. With `spawn`, the handler makes its calls from tasks it spawns instead, NEXT/<id>/a
//! from a child and NEXT/<id>/b from that child's own child, concurrently, and answers
//! "tokio[ok]" when both said "ok" (a fan-out); each handler also spawns a detached task that
//! calls NEXT/<id>/late 20 ms after the response was sent (work outliving its request).
//! Usage: `tokio-service PORT NEXT_URL [background|spawn]`.
use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).expect("PORT");
    let next = args.next().expect("NEXT_URL");
    let mode = args.next().unwrap_or_default();
    let (background, spawn) = (mode == "background", mode == "spawn");
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("client");
    if background {
        let (client, next) = (client.clone(), next.clone());
        tokio::spawn(async move {
            for k in 0u64.. {
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                if let Ok(r) = client.get(format!("{next}/bg/{k}")).send().await {
                    let _ = r.bytes().await;
                }
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (client, next) = (client.clone(), next.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (client, url) = (client.clone(), format!("{next}{}", req.uri().path()));
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    let inner = if spawn {
                        let (late, url_late) = (client.clone(), format!("{url}/late"));
                        tokio::spawn(async move {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            call(&late, &url_late).await
                        });
                        fan_out(client, url).await
                    } else {
                        call(&client, &url).await
                    };
                    let body = format!("tokio[{}]\n", inner.trim());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The body `url` answered with, or what went wrong.
async fn call(client: &reqwest::Client, url: &str) -> String {
    match client.get(url).send().await {
        Ok(r) => r.text().await.unwrap_or_default().trim().to_owned(),
        Err(e) => format!("error: {e}"),
    }
}

/// Calls `url/a` from a spawned task and `url/b` from a task that one spawns, both at once:
/// "ok" when both answered "ok", else what they said.
async fn fan_out(client: reqwest::Client, url: String) -> String {
    let child = tokio::spawn(async move {
        let grandchild = {
            let (client, url) = (client.clone(), format!("{url}/b"));
            tokio::spawn(async move { call(&client, &url).await })
        };
        let a = call(&client, &format!("{url}/a")).await;
        let b = grandchild.await.unwrap_or_else(|e| format!("error: {e}"));
        (a, b)
    });
    match child.await {
        Ok((a, b)) if a == "ok" && b == "ok" => "ok".to_owned(),
        Ok((a, b)) => format!("{a}, {b}"),
        Err(e) => format!("error: {e}"),
    }
}
