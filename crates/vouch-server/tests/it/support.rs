//! A fresh server state on a temporary SQLite database, and request helpers.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use vouch_server::{AppState, Config, build_state, router};

pub struct TestServer {
    pub state: AppState,
    pub router: Router,
    pub admin_key: String,
    _dir: tempfile::TempDir,
}

pub async fn server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::for_data_dir(dir.path());
    let state = build_state(config, None).await.unwrap();
    let admin_key = std::fs::read_to_string(dir.path().join(vouch_server::ADMIN_KEY_FILE)).unwrap().trim().to_owned();
    TestServer { router: router(state.clone()), state, admin_key, _dir: dir }
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub json: serde_json::Value,
}

impl TestServer {
    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type =
            response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Reply { status, content_type, json }
    }

    pub async fn call(&self, method: &str, uri: &str, key: Option<&str>, body: Option<serde_json::Value>) -> Reply {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            builder = builder.header("authorization", format!("Bearer {key}"));
        }
        let request = match body {
            Some(body) => builder.header("content-type", "application/json").body(Body::from(body.to_string())),
            None => builder.body(Body::empty()),
        };
        self.send(request.unwrap()).await
    }
}
