//! Errors as the clients of each API expect them: one HTTP status and one JSON shape each.
//!
//! - OpenAI routes (`/v1/...`, and llama-server's `/tokenize`, `/detokenize`):
//!   `{"error": {"message", "type", "param", "code"}}`; invalid requests are 400.
//! - TGI routes: `{"error", "error_type"}`; invalid parameters are 422 as TGI answers them,
//!   malformed JSON 400 (TGI's axum `Json` extractor does the same).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Which API's error shape to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Tgi,
}

impl Api {
    /// The API a path belongs to.
    #[must_use]
    pub fn of_path(path: &str) -> Api {
        if path.starts_with("/v1/") || path == "/v1" || path == "/tokenize" || path == "/detokenize"
        {
            Api::OpenAi
        } else {
            Api::Tgi
        }
    }
}

/// The class of an error; it picks the OpenAI `type` and the TGI `error_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or a parameter is out of its range.
    Validation,
    /// Missing or wrong API key.
    Authentication,
    /// No such route or model.
    NotFound,
    /// The queue is full.
    Overloaded,
    /// Generation failed after the request was accepted.
    Generation,
    /// The server cannot serve at all (a lost RPC worker, shutting down).
    Unavailable,
}

/// An error response.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub api: Api,
    pub status: StatusCode,
    pub kind: ErrorKind,
    pub message: String,
    /// The offending parameter (OpenAI's `param`).
    pub param: Option<String>,
    /// A machine-readable code (OpenAI's `code`), e.g. `context_length_exceeded`.
    pub code: Option<&'static str>,
    /// Seconds for the `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    #[must_use]
    pub fn new(api: Api, status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            api,
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A parameter out of range or unsupported: 400 on OpenAI routes, 422 on TGI's.
    #[must_use]
    pub fn invalid(api: Api, param: &str, message: impl Into<String>) -> Self {
        let status = match api {
            Api::OpenAi => StatusCode::BAD_REQUEST,
            Api::Tgi => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(api, status, ErrorKind::Validation, message).with_param(param)
    }

    #[must_use]
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = (!param.is_empty()).then(|| param.to_string());
        self
    }

    #[must_use]
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 401.
    #[must_use]
    pub fn unauthorized(api: Api) -> Self {
        ApiError::new(
            api,
            StatusCode::UNAUTHORIZED,
            ErrorKind::Authentication,
            "missing or wrong API key: send the header `Authorization: Bearer <key>`",
        )
        .with_code("invalid_api_key")
    }

    /// 413.
    #[must_use]
    pub fn too_large(api: Api, limit: usize) -> Self {
        ApiError::new(
            api,
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Validation,
            format!("the request body is larger than the limit of {limit} bytes"),
        )
        .with_code("request_too_large")
    }

    /// 503 with `Retry-After`: the queue is full.
    #[must_use]
    pub fn overloaded(api: Api, waiting: usize) -> Self {
        let mut e = ApiError::new(
            api,
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Overloaded,
            format!("the server is busy: {waiting} requests are already waiting; retry later"),
        )
        .with_code("server_overloaded");
        e.retry_after = Some(1);
        e
    }

    /// 503: the server is stopping.
    #[must_use]
    pub fn shutting_down(api: Api) -> Self {
        ApiError::new(
            api,
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Unavailable,
            "the server is shutting down",
        )
    }

    /// 503: the model can no longer generate (e.g. an RPC worker holding some of its layers
    /// was lost); `/health` says the same.
    #[must_use]
    pub fn unhealthy(api: Api, why: &str) -> Self {
        ApiError::new(
            api,
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Unavailable,
            format!("the server cannot generate: {why}"),
        )
    }

    /// 404 for a path no route serves.
    #[must_use]
    pub fn no_route(api: Api, method: &str, path: &str) -> Self {
        ApiError::new(
            api,
            StatusCode::NOT_FOUND,
            ErrorKind::NotFound,
            format!("no route for {method} {path}"),
        )
    }

    /// 405 for a route that exists with other methods.
    #[must_use]
    pub fn wrong_method(api: Api, method: &str, path: &str) -> Self {
        ApiError::new(
            api,
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::NotFound,
            format!("{path} does not take {method} requests"),
        )
    }

    /// 500: generation failed.
    #[must_use]
    pub fn generation(api: Api, message: impl Into<String>) -> Self {
        ApiError::new(
            api,
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Generation,
            message,
        )
    }

    /// The OpenAI `type`.
    #[must_use]
    pub fn openai_type(&self) -> &'static str {
        match self.kind {
            ErrorKind::Validation | ErrorKind::NotFound => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::Overloaded | ErrorKind::Generation | ErrorKind::Unavailable => {
                "server_error"
            }
        }
    }

    /// The TGI `error_type`.
    #[must_use]
    pub fn tgi_type(&self) -> &'static str {
        match self.kind {
            ErrorKind::Validation => "validation",
            ErrorKind::Authentication => "authentication",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Generation => "generation",
            ErrorKind::Unavailable => "unavailable",
        }
    }

    /// The JSON body.
    #[must_use]
    pub fn body(&self) -> serde_json::Value {
        match self.api {
            Api::OpenAi => serde_json::to_value(OpenAiErrorBody {
                error: OpenAiError {
                    message: &self.message,
                    kind: self.openai_type(),
                    param: self.param.as_deref(),
                    code: self.code,
                },
            }),
            Api::Tgi => serde_json::to_value(TgiErrorBody {
                error: &self.message,
                error_type: self.tgi_type(),
            }),
        }
        .unwrap_or_default()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

#[derive(Serialize)]
struct OpenAiErrorBody<'a> {
    error: OpenAiError<'a>,
}

#[derive(Serialize)]
struct OpenAiError<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

#[derive(Serialize)]
struct TgiErrorBody<'a> {
    error: &'a str,
    error_type: &'static str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let e =
            ApiError::invalid(Api::OpenAi, "n", "`n` must be at most 4").with_code("invalid_value");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            e.body(),
            serde_json::json!({"error": {
                "message": "`n` must be at most 4",
                "type": "invalid_request_error",
                "param": "n",
                "code": "invalid_value",
            }})
        );
    }

    #[test]
    fn tgi_shape() {
        let e = ApiError::invalid(Api::Tgi, "top_k", "`top_k` must be strictly positive");
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            e.body(),
            serde_json::json!({"error": "`top_k` must be strictly positive", "error_type": "validation"})
        );
    }

    #[test]
    fn overloaded_has_retry_after() {
        let r = ApiError::overloaded(Api::Tgi, 8).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn paths_pick_their_api() {
        assert_eq!(Api::of_path("/v1/chat/completions"), Api::OpenAi);
        assert_eq!(Api::of_path("/tokenize"), Api::OpenAi);
        assert_eq!(Api::of_path("/generate"), Api::Tgi);
        assert_eq!(Api::of_path("/"), Api::Tgi);
        assert_eq!(Api::of_path("/v1x"), Api::Tgi);
    }
}
