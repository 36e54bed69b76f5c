//! A gRPC round trip through the load balancer, with a real gRPC client
//! (tonic) on one channel, that is one HTTP/2 connection, as a Service would
//! pin to one pod. The load balancer spreads its calls per request over h2c
//! backends, and a server-streaming call streams through.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use crate::support::*;
use hyper::body::Incoming;
use hyper::http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tonic::server::{Grpc, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
struct HelloRequest {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(uint32, tag = "2")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HelloReply {
    #[prost(string, tag = "1")]
    server: String,
    #[prost(uint32, tag = "2")]
    index: u32,
}

const SAY_HELLO: &str = "/lesson.Greeter/SayHello";
const COUNT: &str = "/lesson.Greeter/Count";

/// The greeter of one server: says its name; counts up to `count`.
#[derive(Clone)]
struct Greeter(&'static str);

impl UnaryService<HelloRequest> for Greeter {
    type Response = HelloReply;
    type Future = std::future::Ready<Result<Response<HelloReply>, Status>>;

    fn call(&mut self, _request: Request<HelloRequest>) -> Self::Future {
        std::future::ready(Ok(Response::new(HelloReply {
            server: self.0.to_owned(),
            index: 0,
        })))
    }
}

impl ServerStreamingService<HelloRequest> for Greeter {
    type Response = HelloReply;
    type ResponseStream =
        futures_util::stream::Iter<std::vec::IntoIter<Result<HelloReply, Status>>>;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<HelloRequest>) -> Self::Future {
        let replies: Vec<_> = (1..=request.get_ref().count)
            .map(|index| {
                Ok(HelloReply {
                    server: self.0.to_owned(),
                    index,
                })
            })
            .collect();
        std::future::ready(Ok(Response::new(futures_util::stream::iter(replies))))
    }
}

/// A gRPC server on h2c, named `name`.
async fn grpc_server(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service =
                hyper::service::service_fn(move |request: hyper::Request<Incoming>| async move {
                    let greeter = Greeter(name);
                    let mut grpc = Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default());
                    let response = match request.uri().path() {
                        SAY_HELLO => grpc.unary(greeter, request).await,
                        COUNT => grpc.server_streaming(greeter, request).await,
                        _ => Status::unimplemented("no such method").into_http(),
                    };
                    Ok::<_, Infallible>(response)
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

async fn client(lb: &LoadBalancer) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", lb.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

#[tokio::test]
async fn grpc_calls_on_one_channel_are_spread_over_every_backend() {
    let servers = [
        grpc_server("one").await,
        grpc_server("two").await,
        grpc_server("three").await,
    ];
    let lb = start_load_balancer(&servers, json!({ "backendProtocol": "h2c" }));
    let mut grpc = client(&lb).await;

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..300 {
        grpc.ready().await.unwrap();
        let request = Request::new(HelloRequest {
            name: "learner".into(),
            count: 0,
        });
        let codec = ProstCodec::<HelloRequest, HelloReply>::default();
        let reply = grpc
            .unary(request, PathAndQuery::from_static(SAY_HELLO), codec)
            .await
            .unwrap();
        *counts.entry(reply.into_inner().server).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = ["one", "two", "three"]
        .into_iter()
        .map(|name| (name.to_owned(), 100))
        .collect();
    assert_eq!(
        counts, expected,
        "300 calls on one channel, 100 per backend"
    );
}

#[tokio::test]
async fn a_server_streaming_call_streams_through_and_ends_with_its_status() {
    let servers = [grpc_server("streamer").await];
    let lb = start_load_balancer(&servers, json!({ "backendProtocol": "h2c" }));
    let mut grpc = client(&lb).await;
    grpc.ready().await.unwrap();
    let request = Request::new(HelloRequest {
        name: "learner".into(),
        count: 50,
    });
    let codec = ProstCodec::<HelloRequest, HelloReply>::default();
    let mut stream = grpc
        .server_streaming(request, PathAndQuery::from_static(COUNT), codec)
        .await
        .unwrap()
        .into_inner();
    let mut indexes = Vec::new();
    // The end of the stream comes with the trailers (grpc-status 0); a
    // missing or bad status would be an error here.
    while let Some(reply) = stream.message().await.unwrap() {
        assert_eq!(reply.server, "streamer");
        indexes.push(reply.index);
    }
    assert_eq!(indexes, (1..=50).collect::<Vec<_>>());

    // An unknown method's status (in the trailers) reaches the client too.
    grpc.ready().await.unwrap();
    let codec = ProstCodec::<HelloRequest, HelloReply>::default();
    let status = grpc
        .unary(
            Request::new(HelloRequest::default()),
            PathAndQuery::from_static("/lesson.Greeter/Nope"),
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
}
