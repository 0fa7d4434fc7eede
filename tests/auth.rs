//! Authentication end to end, through the real gateway over HTTP: API keys and JWTs that
//! are accepted (and what the upstream then sees), and every way a credential is refused —
//! each refusal is a 401 envelope with a fixed message, is counted under its reason in
//! `gatehouse_auth_failures_total`, and sends nothing upstream. The caller's credential is
//! never echoed back nor forwarded.

mod support;

use http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;

const HS_SECRET: &str = "integration-test-hmac-secret-of-40-bytes";
const ISSUER: &str = "https://sso.gatehouse.test";
const AUDIENCE: &str = "gatehouse";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|err| panic!("read fixture {name}: {err}"))
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// base64url without padding, to hand-craft tokens jsonwebtoken refuses to build.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn b64url_matches_rfc_4648_vectors() {
    // RFC 4648 §10, unpadded, plus the two characters that differ from standard base64.
    for (input, expected) in [
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(b64url(input.as_bytes()), expected, "{input:?}");
    }
    assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
}

/// `[auth.jwt]` for HS256 with issuer and audience required.
fn hs_section() -> String {
    format!(
        r#"
[auth.jwt]
algorithms = ["HS256"]
secret = "{HS_SECRET}"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
"#
    )
}

/// `[auth.jwt]` for one asymmetric algorithm verified by a public key fixture.
fn public_key_section(algorithm: &str, public_key: &str) -> String {
    format!(
        r#"
[auth.jwt]
algorithms = ["{algorithm}"]
public_key_file = "{}"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
"#,
        fixture(public_key)
    )
}

/// Claims that satisfy every configured rule, for subject `sub`.
fn claims(sub: &str) -> Value {
    json!({
        "sub": sub,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now(),
        "exp": now() + 3600,
    })
}

fn sign(alg: Algorithm, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("token signs")
}

fn hs_key() -> EncodingKey {
    EncodingKey::from_secret(HS_SECRET.as_bytes())
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&pem("rsa_test_private.pem")).expect("RSA test key")
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(&pem("ec_p256_test_private.pem")).expect("EC test key")
}

fn hs(claims: &Value) -> String {
    sign(Algorithm::HS256, claims, &hs_key())
}

/// `token` with its payload replaced by `claims`, keeping the original signature.
fn with_payload(token: &str, claims: &Value) -> String {
    let mut parts = token.split('.');
    let (header, _, signature) = (parts.next(), parts.next(), parts.next());
    format!(
        "{}.{}.{}",
        header.unwrap(),
        b64url(claims.to_string().as_bytes()),
        signature.expect("three segments")
    )
}

/// An unsigned token (`alg: none`) carrying valid claims, with the signature segment given.
fn unsigned(claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    )
}

/// POST a valid generate body with exactly the given `Authorization` values (none, one, …).
async fn generate_with(h: &Harness, authorization: &[&str]) -> TestResponse {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(authorization.iter().map(|value| ("authorization", *value)));
    h.client
        .send(
            Method::POST,
            &h.url("/runway/pro/generate"),
            &headers,
            GENERATE_EXAMPLE,
        )
        .await
}

async fn auth_failures(h: &Harness, reason: &str) -> f64 {
    sample(
        &h.metrics().await,
        "gatehouse_auth_failures_total",
        &[("reason", reason)],
    )
}

/// Sends `authorization` and asserts the refusal: a 401 envelope whose `msg` contains
/// `needle`, one more failure counted under `reason`, nothing sent upstream, and the
/// credential not echoed in the response.
async fn assert_refused(h: &Harness, authorization: &[&str], needle: &str, reason: &str) {
    let before = auth_failures(h, reason).await;
    let upstream_before = h.upstream.received().len();

    let response = generate_with(h, authorization).await;

    response.assert_envelope(401, needle);
    assert_eq!(
        auth_failures(h, reason).await,
        before + 1.0,
        "gatehouse_auth_failures_total{{reason={reason:?}}} for {authorization:?}"
    );
    assert_eq!(
        h.upstream.received().len(),
        upstream_before,
        "a refused request reached the upstream: {authorization:?}"
    );
    for value in authorization {
        let credential = value.split_once(' ').map_or(*value, |(_, c)| c).trim();
        assert_not_in_response(&response, credential);
    }
}

/// The credential (and each long-enough piece of a token) is absent from the response.
fn assert_not_in_response(response: &TestResponse, credential: &str) {
    for needle in pieces(credential) {
        assert!(
            !response.text().contains(needle),
            "credential echoed in the response body: {}",
            response.text()
        );
        for (name, value) in &response.headers {
            assert!(
                !String::from_utf8_lossy(value.as_bytes()).contains(needle),
                "credential echoed in response header {name}"
            );
        }
    }
}

/// The credential and its JWT segments, skipping fragments too short to mean anything.
fn pieces(credential: &str) -> Vec<&str> {
    let mut pieces = vec![credential];
    if credential.contains('.') {
        pieces.extend(credential.split('.'));
    }
    pieces.retain(|piece| piece.len() >= 8);
    pieces
}

/// Nothing the upstream ever received (path, query, header values, body) holds the credential.
fn assert_not_upstream(h: &Harness, credential: &str) {
    let received = h.upstream.received();
    assert!(!received.is_empty(), "the check needs forwarded requests");
    for request in received {
        for needle in pieces(credential) {
            let in_body = request
                .body
                .windows(needle.len())
                .any(|w| w == needle.as_bytes());
            assert!(
                !in_body,
                "credential in the upstream body of {}",
                request.path
            );
            assert!(
                !request.path.contains(needle),
                "credential in upstream path"
            );
            assert!(
                !request.query.as_deref().unwrap_or("").contains(needle),
                "credential in upstream query"
            );
            for (name, value) in &request.headers {
                assert!(
                    !String::from_utf8_lossy(value.as_bytes()).contains(needle),
                    "credential in upstream header {name}"
                );
            }
        }
    }
}

fn requests_total(metrics: &str, key: &str) -> f64 {
    sample(
        metrics,
        "gatehouse_requests_total",
        &[
            ("route", "runway_generate"),
            ("status", "200"),
            ("key", key),
        ],
    )
}

/// The one generate the upstream received carried the upstream token and nothing else.
fn assert_upstream_saw_its_own_token(h: &Harness, forwarded: usize) {
    let seen = h.upstream_requests("/runway/pro/generate");
    assert_eq!(seen.len(), forwarded, "generates forwarded");
    for request in seen {
        let values: Vec<_> = request.headers.get_all("authorization").iter().collect();
        assert_eq!(
            values,
            [format!("Bearer {UPSTREAM_TOKEN}").as_str()],
            "the upstream gets exactly its own token"
        );
    }
}

// ---------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_authorization_is_refused() {
    let h = Harness::start("").await;
    assert_refused(&h, &[], "missing credential", "missing_credential").await;
    // The feed route is protected the same way.
    let response = h
        .client
        .send(
            Method::POST,
            &h.url("/runway/feed"),
            &[("content-type", "application/json")],
            r#"{"task_id":"t-1"}"#,
        )
        .await;
    response.assert_envelope(401, "missing credential");
    assert_eq!(auth_failures(&h, "missing_credential").await, 2.0);
    assert!(h.upstream.received().is_empty());
}

#[tokio::test]
async fn malformed_authorization_headers_are_refused() {
    let h = Harness::start("").await;
    let basic = format!("Basic {KEY_A}");
    assert_refused(
        &h,
        &[&basic],
        "malformed Authorization header",
        "malformed_header",
    )
    .await;
    // A bare key without a scheme, an empty Bearer, and two credentials at once.
    let bearer_a = format!("Bearer {KEY_A}");
    let bearer_b = format!("Bearer {KEY_B}");
    for authorization in [vec![KEY_A], vec!["Bearer "], vec![&bearer_a, &bearer_b]] {
        assert_refused(
            &h,
            &authorization,
            "malformed Authorization header",
            "malformed_header",
        )
        .await;
    }
}

#[tokio::test]
async fn unknown_api_key_is_refused() {
    let h = Harness::start("").await;
    let unknown = "ka_ffffffffffffffffffffffffffffffff";
    assert_refused(
        &h,
        &[&format!("Bearer {unknown}")],
        "unknown API key",
        "unknown_key",
    )
    .await;
    // One character short of a valid key is a different key.
    let truncated = format!("Bearer {}", &KEY_A[..KEY_A.len() - 1]);
    assert_refused(&h, &[&truncated], "unknown API key", "unknown_key").await;
}

#[tokio::test]
async fn valid_api_key_is_forwarded_with_the_upstream_token() {
    let h = Harness::start("").await;

    let response = h.generate(KEY_A, GENERATE_EXAMPLE).await;

    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.json()["code"], 200);
    assert_upstream_saw_its_own_token(&h, 1);
    assert_not_upstream(&h, KEY_A);
    assert_not_in_response(&response, KEY_A);
    let metrics = h.metrics().await;
    assert_eq!(requests_total(&metrics, "a"), 1.0);
    assert_eq!(
        sample(&metrics, "gatehouse_auth_failures_total", &[]),
        0.0,
        "no failure counted"
    );
}

// ---------------------------------------------------------------------------------------
// JWTs that are accepted
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hs256_jwt_is_accepted_and_labelled_by_its_keys_entry_or_as_jwt() {
    let h = Harness::start(&hs_section()).await;
    let listed = hs(&claims("a"));
    let unlisted = hs(&claims("alice"));

    let as_a = generate_with(&h, &[&format!("Bearer {listed}")]).await;
    let as_alice = generate_with(&h, &[&format!("Bearer {unlisted}")]).await;
    // API keys keep working next to [auth.jwt].
    let as_b = h.generate(KEY_B, GENERATE_EXAMPLE).await;

    for response in [&as_a, &as_alice, &as_b] {
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        assert_eq!(response.json()["code"], 200);
    }
    assert_upstream_saw_its_own_token(&h, 3);
    for credential in [listed.as_str(), unlisted.as_str(), KEY_B] {
        assert_not_upstream(&h, credential);
    }
    assert_not_in_response(&as_a, &listed);
    assert_not_in_response(&as_alice, &unlisted);
    let metrics = h.metrics().await;
    assert_eq!(
        requests_total(&metrics, "a"),
        1.0,
        "a subject with a [[keys]] entry uses that key's label"
    );
    assert_eq!(
        requests_total(&metrics, "_jwt"),
        1.0,
        "a subject without one shares the _jwt label"
    );
    assert_eq!(requests_total(&metrics, "b"), 1.0);
    assert!(
        !metrics.contains("alice"),
        "an unlisted subject must not become a label value"
    );
}

#[tokio::test]
async fn rs256_and_es256_jwts_are_accepted() {
    for (algorithm, public_key, alg, key) in [
        ("RS256", "rsa_test_public.pem", Algorithm::RS256, rsa_key()),
        (
            "ES256",
            "ec_p256_test_public.pem",
            Algorithm::ES256,
            ec_key(),
        ),
    ] {
        let h = Harness::start(&public_key_section(algorithm, public_key)).await;
        let token = sign(alg, &claims("carol"), &key);

        let response = generate_with(&h, &[&format!("Bearer {token}")]).await;

        assert_eq!(
            response.status,
            StatusCode::OK,
            "{algorithm}: {}",
            response.text()
        );
        assert_upstream_saw_its_own_token(&h, 1);
        assert_not_upstream(&h, &token);
        assert_not_in_response(&response, &token);
        assert_eq!(
            requests_total(&h.metrics().await, "_jwt"),
            1.0,
            "{algorithm}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// JWTs that are refused
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unsigned_alg_none_tokens_are_refused() {
    let h = Harness::start(&hs_section()).await;
    for signature in ["", "c2lnbmF0dXJl"] {
        let token = unsigned(&claims("a"), signature);
        assert_refused(
            &h,
            &[&format!("Bearer {token}")],
            "malformed JWT",
            "malformed_token",
        )
        .await;
    }
    // Nor when only asymmetric algorithms are configured.
    let h = Harness::start(&public_key_section("RS256", "rsa_test_public.pem")).await;
    let token = unsigned(&claims("a"), "");
    assert_refused(
        &h,
        &[&format!("Bearer {token}")],
        "malformed JWT",
        "malformed_token",
    )
    .await;
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    // Algorithm confusion: the public key is public, so anyone can HMAC with its PEM bytes;
    // a verifier that let the token's header pick the algorithm would accept this.
    let h = Harness::start(&public_key_section("RS256", "rsa_test_public.pem")).await;
    let public_pem = pem("rsa_test_public.pem");
    let forged = sign(
        Algorithm::HS256,
        &claims("a"),
        &EncodingKey::from_secret(&public_pem),
    );
    assert_refused(
        &h,
        &[&format!("Bearer {forged}")],
        "JWT algorithm is not allowed",
        "algorithm_not_allowed",
    )
    .await;
    // The same with the PEM's trailing newline trimmed, as some forgers try.
    let trimmed = String::from_utf8(public_pem).unwrap();
    let forged = sign(
        Algorithm::HS256,
        &claims("a"),
        &EncodingKey::from_secret(trimmed.trim_end().as_bytes()),
    );
    assert_refused(
        &h,
        &[&format!("Bearer {forged}")],
        "JWT algorithm is not allowed",
        "algorithm_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn algorithms_outside_the_configured_list_are_refused() {
    let h = Harness::start(&hs_section()).await;
    let hs384 = sign(Algorithm::HS384, &claims("a"), &hs_key());
    let rs256 = sign(Algorithm::RS256, &claims("a"), &rsa_key());
    for token in [hs384, rs256] {
        assert_refused(
            &h,
            &[&format!("Bearer {token}")],
            "JWT algorithm is not allowed",
            "algorithm_not_allowed",
        )
        .await;
    }
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_refused() {
    let h = Harness::start(&hs_section()).await;
    // Far outside the default 30 s leeway, so the outcome does not depend on timing.
    let mut expired = claims("a");
    expired["exp"] = json!(now() - 3600);
    assert_refused(
        &h,
        &[&format!("Bearer {}", hs(&expired))],
        "JWT has expired",
        "expired",
    )
    .await;

    let mut early = claims("a");
    early["nbf"] = json!(now() + 3600);
    assert_refused(
        &h,
        &[&format!("Bearer {}", hs(&early))],
        "JWT is not valid yet",
        "not_yet_valid",
    )
    .await;
}

#[tokio::test]
async fn wrong_issuer_and_audience_are_refused() {
    let h = Harness::start(&hs_section()).await;
    let mut wrong_iss = claims("a");
    wrong_iss["iss"] = json!("https://evil.test");
    assert_refused(
        &h,
        &[&format!("Bearer {}", hs(&wrong_iss))],
        "JWT issuer (iss) is not accepted",
        "wrong_issuer",
    )
    .await;

    let mut wrong_aud = claims("a");
    wrong_aud["aud"] = json!("another-service");
    assert_refused(
        &h,
        &[&format!("Bearer {}", hs(&wrong_aud))],
        "JWT audience (aud) is not accepted",
        "wrong_audience",
    )
    .await;
}

#[tokio::test]
async fn bad_signatures_are_refused() {
    let h = Harness::start(&hs_section()).await;
    // A valid token for `alice` whose payload is swapped for `a`'s claims.
    let tampered = with_payload(&hs(&claims("alice")), &claims("a"));
    assert_refused(
        &h,
        &[&format!("Bearer {tampered}")],
        "JWT signature is invalid",
        "bad_signature",
    )
    .await;
    // Signed with another secret.
    let other = sign(
        Algorithm::HS256,
        &claims("a"),
        &EncodingKey::from_secret(b"some-other-secret-that-is-long-enough"),
    );
    assert_refused(
        &h,
        &[&format!("Bearer {other}")],
        "JWT signature is invalid",
        "bad_signature",
    )
    .await;

    let h = Harness::start(&public_key_section("RS256", "rsa_test_public.pem")).await;
    let tampered = with_payload(
        &sign(Algorithm::RS256, &claims("alice"), &rsa_key()),
        &claims("a"),
    );
    assert_refused(
        &h,
        &[&format!("Bearer {tampered}")],
        "JWT signature is invalid",
        "bad_signature",
    )
    .await;
}

#[tokio::test]
async fn malformed_tokens_are_refused() {
    let h = Harness::start(&hs_section()).await;
    let valid = hs(&claims("a"));
    let (header, rest) = valid.split_once('.').unwrap();
    let (payload, _) = rest.split_once('.').unwrap();
    for token in [
        // Three base64url segments that decode to nothing sensible.
        "abc.def.ghi".to_string(),
        // A header that is not JSON.
        format!("{}.{payload}.c2ln", b64url(b"not json")),
        // A signature that cannot be base64url-decoded (one lone character).
        format!("{header}.{payload}.A"),
    ] {
        assert_refused(
            &h,
            &[&format!("Bearer {token}")],
            "malformed JWT",
            "malformed_token",
        )
        .await;
    }
    // Without three segments a credential does not have the shape of a JWT, so it is looked
    // up (and not found) as an API key.
    for token in [format!("{header}.{payload}"), "garbage".to_string()] {
        assert_refused(
            &h,
            &[&format!("Bearer {token}")],
            "unknown API key",
            "unknown_key",
        )
        .await;
    }
}

#[tokio::test]
async fn tokens_without_the_key_claim_are_refused() {
    let h = Harness::start(&hs_section()).await;
    let mut no_sub = claims("a");
    no_sub.as_object_mut().unwrap().remove("sub");
    let mut empty_sub = claims("a");
    empty_sub["sub"] = json!("");
    let mut no_exp = claims("a");
    no_exp.as_object_mut().unwrap().remove("exp");
    for claims in [no_sub, empty_sub, no_exp] {
        assert_refused(
            &h,
            &[&format!("Bearer {}", hs(&claims))],
            "JWT lacks a required claim",
            "missing_claim",
        )
        .await;
    }

    // A configured key_claim other than `sub` is the one that must be present.
    let section = format!(
        "\n[auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"{HS_SECRET}\"\nkey_claim = \"client_id\"\n"
    );
    let h = Harness::start(&section).await;
    let only_sub = json!({ "sub": "a", "exp": now() + 3600 });
    assert_refused(
        &h,
        &[&format!("Bearer {}", hs(&only_sub))],
        "JWT lacks a required claim",
        "missing_claim",
    )
    .await;
    let with_client_id = json!({ "sub": "someone", "client_id": "a", "exp": now() + 3600 });
    let response = generate_with(&h, &[&format!("Bearer {}", hs(&with_client_id))]).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(requests_total(&h.metrics().await, "a"), 1.0);
}

// ---------------------------------------------------------------------------------------
// The credential stays with the caller
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn credentials_never_reach_the_upstream_or_the_response() {
    let h = Harness::start(&hs_section()).await;
    let jwt = hs(&claims("a"));
    let expired_jwt = {
        let mut claims = claims("a");
        claims["exp"] = json!(now() - 3600);
        hs(&claims)
    };
    let unknown_key = "kz_secret-looking-but-unknown-0123456789";

    // Accepted credentials, on both proxied routes.
    let mut responses = Vec::new();
    for credential in [KEY_A, jwt.as_str()] {
        let submitted = h.generate(credential, GENERATE_EXAMPLE).await;
        assert_eq!(submitted.status, StatusCode::OK, "{}", submitted.text());
        let task_id = submitted.json()["data"]["task_id"]
            .as_str()
            .expect("task id")
            .to_string();
        let fed = h.feed(credential, &task_id).await;
        assert_eq!(fed.status, StatusCode::OK, "{}", fed.text());
        responses.push((credential.to_string(), submitted));
        responses.push((credential.to_string(), fed));
    }
    // Refused credentials.
    for credential in [expired_jwt.as_str(), unknown_key] {
        let refused = h.generate(credential, GENERATE_EXAMPLE).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        responses.push((credential.to_string(), refused));
    }

    for (credential, response) in &responses {
        assert_not_in_response(response, credential);
    }
    assert_eq!(
        h.upstream.received().len(),
        4,
        "two generates and two feeds"
    );
    assert_upstream_saw_its_own_token(&h, 2);
    for credential in [KEY_A, jwt.as_str(), expired_jwt.as_str(), unknown_key] {
        assert_not_upstream(&h, credential);
    }
    // Nor does the credential show up in the metrics text.
    let metrics = h.metrics().await;
    for credential in [KEY_A, jwt.as_str(), expired_jwt.as_str(), unknown_key] {
        for piece in pieces(credential) {
            assert!(!metrics.contains(piece), "credential in /metrics");
        }
    }
}
