//! JSON Web Tokens per `[auth.jwt]`: the keys are loaded and checked once per config
//! snapshot; each token is verified against them and yields the value of `key_claim`.
//!
//! What a token must satisfy:
//! - its header `alg` is one of `auth.jwt.algorithms` (so `alg: none`, which jsonwebtoken
//!   cannot even parse, and HS256 tokens "signed" with an RSA public key are refused);
//! - the key is chosen by `kid` among `kid_keys` when those are configured, else it is the
//!   `secret` / `public_key_file`; a key only verifies the algorithms of its own type
//!   (RSA for RS*/PS*, EC on the right curve for ES*, Ed25519 for EdDSA);
//! - `exp` is present and not past, `nbf` (if present) not in the future, both with
//!   `leeway_s` of clock skew; `iss` / `aud` are present and match when configured
//!   (`aud` is ignored when no audience is configured);
//! - `key_claim` is a string that is a sane id (see `is_sane_id`).

use crate::config::JwtConfig;
use crate::error::AuthFailure;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use std::collections::HashMap;
use std::path::Path;

/// Largest accepted `auth.jwt.leeway_s`. Clock skew is seconds to minutes; a larger value is
/// a typo, and an absurd one would overflow jsonwebtoken's `now - leeway`.
const MAX_LEEWAY_S: u64 = 86_400;

/// Longest accepted value of the key claim (it becomes the principal's key id).
const MAX_KEY_ID_CHARS: usize = 128;

/// One verification key and the validation rules for tokens it verifies.
struct VerificationKey {
    key: DecodingKey,
    /// `algorithms` holds only the configured algorithms this key can verify.
    validation: Validation,
}

/// Verifies JWTs for one config snapshot.
pub(super) struct JwtVerifier {
    /// `auth.jwt.algorithms`.
    allowed: Vec<Algorithm>,
    /// `secret` or `public_key_file`; used when the token names no `kid`, or when no
    /// `kid_keys` are configured.
    default_key: Option<VerificationKey>,
    kid_keys: HashMap<String, VerificationKey>,
    key_claim: String,
}

impl JwtVerifier {
    /// Loads the keys; every problem is appended to `problems`, naming the setting and path.
    pub(super) fn from_config(jwt: &JwtConfig, problems: &mut Vec<String>) -> Option<JwtVerifier> {
        let first_problem = problems.len();
        if jwt.algorithms.is_empty() {
            problems
                .push("auth.jwt.algorithms: list at least one algorithm, e.g. [\"HS256\"]".into());
        }
        if jwt.leeway_s > MAX_LEEWAY_S {
            problems.push(format!(
                "auth.jwt.leeway_s: expected at most {MAX_LEEWAY_S} seconds of clock skew, got {}",
                jwt.leeway_s
            ));
        }
        let (hmac, asymmetric): (Vec<Algorithm>, Vec<Algorithm>) = jwt
            .algorithms
            .iter()
            .partition(|alg| alg.family() == AlgorithmFamily::Hmac);
        if !hmac.is_empty() && !asymmetric.is_empty() {
            // Config validation refuses this too; repeated here because accepting both is
            // exactly what an algorithm confusion attack needs.
            problems.push(
                "auth.jwt.algorithms: HS* cannot be mixed with RS*/PS*/ES*/EdDSA (algorithm confusion)"
                    .into(),
            );
            return None;
        }
        let validation = |algorithms: Vec<Algorithm>| validation(jwt, algorithms);

        let mut default_key = None;
        let mut kid_keys = HashMap::new();
        if !hmac.is_empty() {
            match &jwt.secret {
                Some(secret) => {
                    default_key = Some(VerificationKey {
                        key: DecodingKey::from_secret(secret.expose().as_bytes()),
                        validation: validation(hmac.clone()),
                    })
                }
                None => problems.push(format!(
                    "auth.jwt.secret: required for {}",
                    algorithm_list(&hmac)
                )),
            }
            if jwt.public_key_file.is_some() {
                problems.push(format!(
                    "auth.jwt.public_key_file: not used by {}, which verify with auth.jwt.secret; remove it",
                    algorithm_list(&hmac)
                ));
            }
            if !jwt.kid_keys.is_empty() {
                problems.push(format!(
                    "auth.jwt.kid_keys: public keys are not used by {}, which verify with auth.jwt.secret; remove them",
                    algorithm_list(&hmac)
                ));
            }
        } else if !asymmetric.is_empty() {
            if jwt.secret.is_some() {
                problems.push(format!(
                    "auth.jwt.secret: not used by {}, which verify with public keys; remove it",
                    algorithm_list(&asymmetric)
                ));
            }
            if let Some(path) = &jwt.public_key_file {
                default_key =
                    load_public_key("auth.jwt.public_key_file", path, &asymmetric, problems).map(
                        |(key, algorithms)| VerificationKey {
                            key,
                            validation: validation(algorithms),
                        },
                    );
            }
            for (i, entry) in jwt.kid_keys.iter().enumerate() {
                if entry.kid.is_empty() {
                    problems.push(format!("auth.jwt.kid_keys[{i}].kid: must not be empty"));
                }
                if kid_keys.contains_key(&entry.kid) {
                    problems.push(format!(
                        "auth.jwt.kid_keys[{i}].kid: duplicate kid {:?}",
                        entry.kid
                    ));
                    continue;
                }
                let setting = format!("auth.jwt.kid_keys[{i}].public_key_file");
                if let Some((key, algorithms)) =
                    load_public_key(&setting, &entry.public_key_file, &asymmetric, problems)
                {
                    kid_keys.insert(
                        entry.kid.clone(),
                        VerificationKey {
                            key,
                            validation: validation(algorithms),
                        },
                    );
                }
            }
            if jwt.public_key_file.is_none() && jwt.kid_keys.is_empty() {
                problems.push(format!(
                    "auth.jwt.public_key_file: required for {} (or list auth.jwt.kid_keys)",
                    algorithm_list(&asymmetric)
                ));
            }
        }
        if jwt.key_claim.is_empty() {
            problems.push("auth.jwt.key_claim: must name a claim, e.g. \"sub\"".into());
        }
        if problems.len() > first_problem {
            return None;
        }
        Some(JwtVerifier {
            allowed: jwt.algorithms.clone(),
            default_key,
            kid_keys,
            key_claim: jwt.key_claim.clone(),
        })
    }

    /// Verifies a token and returns the value of the key claim.
    pub(super) fn verify(&self, token: &str) -> Result<String, AuthFailure> {
        // An unparseable header includes `alg: none` (jsonwebtoken has no such algorithm).
        let header = jsonwebtoken::decode_header(token).map_err(|err| failure(&err))?;
        if !self.allowed.contains(&header.alg) {
            return Err(AuthFailure::AlgorithmNotAllowed);
        }
        // RFC 7515 §4.1.11: extensions listed in `crit` must be understood; we know none.
        if header.crit.is_some() {
            return Err(AuthFailure::MalformedToken);
        }
        let key = match (&header.kid, self.kid_keys.is_empty()) {
            (Some(kid), false) => self.kid_keys.get(kid).ok_or(AuthFailure::UnknownKid)?,
            // No `kid`, or no `kid_keys` for it to select from: the `secret` / `public_key_file`.
            _ => self.default_key.as_ref().ok_or(AuthFailure::UnknownKid)?,
        };
        // The algorithm is allowed, but not for this key's type (e.g. an ES256 token naming an
        // RSA key's kid). jsonwebtoken refuses this too; checking first gives the precise label.
        if !key.validation.algorithms.contains(&header.alg) {
            return Err(AuthFailure::AlgorithmNotAllowed);
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.key,
            &key.validation,
        )
        .map_err(|err| failure(&err))?;
        match data.claims.get(&self.key_claim) {
            Some(serde_json::Value::String(value)) if is_sane_id(value) => Ok(value.clone()),
            _ => Err(AuthFailure::MissingClaim),
        }
    }
}

/// The validation rules shared by every key, for the algorithms one key can verify.
fn validation(jwt: &JwtConfig, algorithms: Vec<Algorithm>) -> Validation {
    let mut validation = Validation {
        algorithms,
        leeway: jwt.leeway_s,
        validate_exp: true,
        validate_nbf: true,
        ..Validation::default()
    };
    // jsonwebtoken checks `iss` / `aud` only when present, so configured ones are also required.
    let mut required = vec!["exp"];
    if let Some(issuer) = &jwt.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match &jwt.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        // With no audience configured there is nothing to match `aud` against; jsonwebtoken
        // would otherwise refuse every token that carries one.
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// Whether a credential has the shape of a compact JWS: three base64url segments.
///
/// The signature segment may be empty so that unsigned (`alg: none`) tokens are refused as
/// tokens, with a token label, rather than looked up as API keys.
pub(super) fn looks_like_jwt(credential: &str) -> bool {
    let base64url = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let mut parts = credential.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(payload), Some(signature), None) => {
            !header.is_empty()
                && !payload.is_empty()
                && base64url(header)
                && base64url(payload)
                && base64url(signature)
        }
        _ => false,
    }
}

/// Whether a claim value can serve as a key id: it ends up in logs, the ledger and
/// `RequestContext`, so it must be short and printable. Non-ASCII letters and digits are
/// accepted (user names are not all ASCII), but not whitespace, control or format
/// characters (e.g. bidirectional overrides that disguise a log line).
fn is_sane_id(value: &str) -> bool {
    !value.is_empty()
        && value.chars().count() <= MAX_KEY_ID_CHARS
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() || (!c.is_ascii() && c.is_alphanumeric()))
}

/// Maps jsonwebtoken's error to the fixed failure label.
fn failure(err: &jsonwebtoken::errors::Error) -> AuthFailure {
    match err.kind() {
        ErrorKind::InvalidSignature => AuthFailure::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => AuthFailure::AlgorithmNotAllowed,
        ErrorKind::ExpiredSignature => AuthFailure::Expired,
        ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
        ErrorKind::InvalidIssuer => AuthFailure::WrongIssuer,
        ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
        ErrorKind::MissingRequiredClaim(_)
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::InvalidSubject => AuthFailure::MissingClaim,
        // Keys are checked when loaded, so these mean the signature could not be verified.
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => AuthFailure::BadSignature,
        // InvalidToken, Base64, Json, Utf8, and kinds added by later versions.
        _ => AuthFailure::MalformedToken,
    }
}

/// Reads a PEM public key and returns it with the configured algorithms it can verify.
fn load_public_key(
    setting: &str,
    path: &Path,
    algorithms: &[Algorithm],
    problems: &mut Vec<String>,
) -> Option<(DecodingKey, Vec<Algorithm>)> {
    let wanted = algorithm_list(algorithms);
    let shown = path.display();
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(err) => {
            problems.push(format!("{setting}: cannot read {shown}: {err}"));
            return None;
        }
    };
    let text = String::from_utf8_lossy(&pem);
    match pem_label(&text) {
        Some("PUBLIC KEY" | "RSA PUBLIC KEY") => {}
        Some(label) if label.contains("PRIVATE") => {
            // The gateway only verifies; a signing key does not belong on it.
            problems.push(format!(
                "{setting}: {shown} holds a private key; give its public key (openssl pkey -in KEY.pem -pubout)"
            ));
            return None;
        }
        Some(label) => {
            problems.push(format!(
                "{setting}: {shown} holds a PEM {label:?}, expected a public key (-----BEGIN PUBLIC KEY-----) for {wanted}"
            ));
            return None;
        }
        None => {
            problems.push(format!(
                "{setting}: {shown} is not a valid PEM public key for {wanted}"
            ));
            return None;
        }
    }
    // The PEM's own type decides which parser accepts it; "PUBLIC KEY" is told apart by OID.
    let parsed = DecodingKey::from_rsa_pem(&pem)
        .or_else(|_| DecodingKey::from_ec_pem(&pem))
        .or_else(|_| DecodingKey::from_ed_pem(&pem));
    let Ok(key) = parsed else {
        problems.push(format!(
            "{setting}: {shown} is not a valid PEM public key for {wanted}"
        ));
        return None;
    };
    let same_type: Vec<Algorithm> = algorithms
        .iter()
        .copied()
        .filter(|alg| alg.family() == key.family())
        .collect();
    if same_type.is_empty() {
        let mut needed: Vec<&str> = Vec::new();
        for alg in algorithms {
            if !needed.contains(&key_type(alg.family())) {
                needed.push(key_type(alg.family()));
            }
        }
        problems.push(format!(
            "{setting}: {shown} holds {} public key, but auth.jwt.algorithms {wanted} need {} key",
            key_type(key.family()),
            needed.join(" or ")
        ));
        return None;
    }
    let usable: Vec<Algorithm> = same_type
        .iter()
        .copied()
        .filter(|alg| key_fits(&key, *alg))
        .collect();
    if usable.is_empty() {
        let hint = if key.family() == AlgorithmFamily::Ec {
            " (ES256 needs a P-256 key, ES384 a P-384 key)"
        } else {
            ""
        };
        problems.push(format!(
            "{setting}: {shown} is not a valid PEM public key for {}{hint}",
            algorithm_list(&same_type)
        ));
        return None;
    }
    Some((key, usable))
}

/// Whether the key can verify `alg`: jsonwebtoken only extracts bytes from the PEM, so the
/// key itself is parsed here, once, instead of failing on every request.
fn key_fits(key: &DecodingKey, alg: Algorithm) -> bool {
    // Parses an RSA key's DER and checks an EC point's encoding.
    if Jwk::from_decoding_key(key, Some(alg)).is_err() {
        return false;
    }
    // Builds the verifier, which parses EC points on `alg`'s curve and Ed25519 points; an
    // empty signature then simply does not verify (Ok(false)).
    jsonwebtoken::crypto::verify("", b"", key, alg).is_ok()
}

/// The type label of the first `-----BEGIN <label>-----` line.
fn pem_label(text: &str) -> Option<&str> {
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let rest = &text[start..];
    Some(&rest[..rest.find("-----")?])
}

fn key_type(family: AlgorithmFamily) -> &'static str {
    match family {
        AlgorithmFamily::Hmac => "a shared secret",
        AlgorithmFamily::Rsa => "an RSA",
        AlgorithmFamily::Ec => "an EC",
        AlgorithmFamily::Ed => "an Ed25519",
    }
}

fn algorithm_list(algorithms: &[Algorithm]) -> String {
    let names: Vec<String> = algorithms.iter().map(|alg| format!("{alg:?}")).collect();
    format!("[{}]", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::auth::{Authenticator, CredentialKind, Principal, UNLISTED_JWT_LABEL};
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{json, Value};
    use std::sync::Arc;

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn pem(name: &str) -> Vec<u8> {
        std::fs::read(fixture(name)).unwrap()
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn hs_key() -> EncodingKey {
        EncodingKey::from_secret(HS_SECRET.as_bytes())
    }

    fn rsa_key() -> EncodingKey {
        EncodingKey::from_rsa_pem(&pem("rsa_test_private.pem")).unwrap()
    }

    fn ec_key() -> EncodingKey {
        EncodingKey::from_ec_pem(&pem("ec_p256_test_private.pem")).unwrap()
    }

    fn ed_key() -> EncodingKey {
        EncodingKey::from_ed_pem(&pem("ed25519_test_private.pem")).unwrap()
    }

    /// Valid claims for subject `sub`, expiring in an hour.
    fn claims(sub: &str) -> Value {
        json!({ "sub": sub, "exp": now() + 3600, "iat": now() })
    }

    /// HS256 with issuer and audience configured.
    fn hs_authenticator() -> Authenticator {
        authenticator(&format!(
            r#"
            [auth.jwt]
            algorithms = ["HS256"]
            secret = "{HS_SECRET}"
            issuer = "https://sso.test"
            audience = "gatehouse"
            "#
        ))
    }

    fn hs_claims(sub: &str) -> Value {
        let mut claims = claims(sub);
        claims["iss"] = json!("https://sso.test");
        claims["aud"] = json!("gatehouse");
        claims
    }

    fn authenticator(jwt_section: &str) -> Authenticator {
        Authenticator::from_config(&config(jwt_section)).unwrap()
    }

    fn public_key_section(algorithms: &str, file: &str) -> String {
        format!(
            "[auth.jwt]\nalgorithms = {algorithms}\npublic_key_file = \"{}\"\n",
            fixture(file)
        )
    }

    fn check(auth: &Authenticator, token: &str) -> Result<Principal, AuthFailure> {
        auth.authenticate(&bearer(token))
    }

    /// base64url without padding, to build tokens jsonwebtoken refuses to build.
    fn b64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn hs256_token_without_keys_entry_gets_defaults() {
        let auth = hs_authenticator();
        let principal = check(
            &auth,
            &sign(Algorithm::HS256, None, &hs_claims("alice"), &hs_key()),
        )
        .unwrap();
        assert_eq!(principal.key_id, "alice");
        assert_eq!(principal.metrics_label, UNLISTED_JWT_LABEL);
        assert_eq!(principal.credential, CredentialKind::Jwt);
        assert_eq!(principal.policy.rate_per_second, 1.0, "[defaults]");
        assert_eq!(principal.policy.burst, 2);
        let bob = check(
            &auth,
            &sign(Algorithm::HS256, None, &hs_claims("bob"), &hs_key()),
        )
        .unwrap();
        assert!(
            Arc::ptr_eq(&principal.policy, &bob.policy),
            "one shared defaults policy"
        );
    }

    #[test]
    fn jwt_subject_with_keys_entry_gets_its_policy() {
        let auth = hs_authenticator();
        let principal = check(
            &auth,
            &sign(Algorithm::HS256, None, &hs_claims("team-a"), &hs_key()),
        )
        .unwrap();
        assert_eq!(principal.key_id, "team-a");
        assert_eq!(principal.metrics_label, "team-a");
        assert_eq!(principal.credential, CredentialKind::Jwt);
        assert_eq!(principal.policy.rate_per_second, 7.0);
        // The same policy object as the key's API-key principals.
        let by_key = auth.authenticate(&bearer(API_KEY)).unwrap();
        assert!(Arc::ptr_eq(&principal.policy, &by_key.policy));
    }

    #[test]
    fn key_claim_is_configurable() {
        let auth = authenticator(&format!(
            "[auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"{HS_SECRET}\"\nkey_claim = \"client_id\"\n"
        ));
        let claims = json!({ "sub": "someone", "client_id": "team-a", "exp": now() + 60 });
        let principal = check(&auth, &sign(Algorithm::HS256, None, &claims, &hs_key())).unwrap();
        assert_eq!(principal.key_id, "team-a");
        let no_claim = json!({ "sub": "team-a", "exp": now() + 60 });
        assert_eq!(
            check(&auth, &sign(Algorithm::HS256, None, &no_claim, &hs_key())).unwrap_err(),
            AuthFailure::MissingClaim
        );
    }

    #[test]
    fn rs256_es256_and_eddsa_tokens_verify() {
        for (algorithms, file, alg, key) in [
            (
                "[\"RS256\"]",
                "rsa_test_public.pem",
                Algorithm::RS256,
                rsa_key(),
            ),
            (
                "[\"PS256\"]",
                "rsa_test_public.pem",
                Algorithm::PS256,
                rsa_key(),
            ),
            (
                "[\"ES256\"]",
                "ec_p256_test_public.pem",
                Algorithm::ES256,
                ec_key(),
            ),
            (
                "[\"EdDSA\"]",
                "ed25519_test_public.pem",
                Algorithm::EdDSA,
                ed_key(),
            ),
        ] {
            let auth = authenticator(&public_key_section(algorithms, file));
            let principal = check(&auth, &sign(alg, None, &claims("carol"), &key))
                .unwrap_or_else(|err| panic!("{alg:?}: {err:?}"));
            assert_eq!(principal.key_id, "carol");
            // A token signed by another key of the same type does not verify.
            let forged = match alg {
                Algorithm::ES256 => {
                    let other =
                        jsonwebtoken::encode(&Header::new(alg), &claims("carol"), &key).unwrap();
                    // ECDSA signatures are randomized: graft one token's signature onto
                    // another token's claims.
                    let token = sign(alg, None, &claims("mallory"), &key);
                    let (message, _) = token.rsplit_once('.').unwrap();
                    format!("{message}.{}", other.rsplit_once('.').unwrap().1)
                }
                _ => {
                    let token = sign(alg, None, &claims("carol"), &key);
                    let (_, signature) = token.rsplit_once('.').unwrap();
                    let header = token.split('.').next().unwrap();
                    let payload = b64url(claims("mallory").to_string().as_bytes());
                    format!("{header}.{payload}.{signature}")
                }
            };
            assert_eq!(
                check(&auth, &forged).unwrap_err(),
                AuthFailure::BadSignature,
                "{alg:?}"
            );
        }
    }

    #[test]
    fn api_keys_still_work_when_jwt_is_configured() {
        let auth = hs_authenticator();
        assert_eq!(
            auth.authenticate(&bearer(API_KEY)).unwrap().key_id,
            "team-a"
        );
        assert_eq!(
            auth.authenticate(&bearer("nope")).unwrap_err(),
            AuthFailure::UnknownKey
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let auth = hs_authenticator();
        let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64url(hs_claims("alice").to_string().as_bytes());
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}.c2ln"),
        ] {
            assert_eq!(
                check(&auth, &token).unwrap_err(),
                AuthFailure::MalformedToken,
                "{token}"
            );
        }
    }

    #[test]
    fn hs256_signed_with_the_rsa_public_key_is_refused() {
        // The classic confusion attack: the public key is public, so anyone can compute
        // an HMAC with it; a verifier that let the token pick the algorithm would accept it.
        let auth = authenticator(&public_key_section("[\"RS256\"]", "rsa_test_public.pem"));
        let public_pem = pem("rsa_test_public.pem");
        let token = sign(
            Algorithm::HS256,
            None,
            &claims("mallory"),
            &EncodingKey::from_secret(&public_pem),
        );
        assert_eq!(
            check(&auth, &token).unwrap_err(),
            AuthFailure::AlgorithmNotAllowed
        );
    }

    #[test]
    fn algorithm_outside_the_list_is_refused() {
        let auth = hs_authenticator();
        let token = sign(Algorithm::HS384, None, &hs_claims("alice"), &hs_key());
        assert_eq!(
            check(&auth, &token).unwrap_err(),
            AuthFailure::AlgorithmNotAllowed
        );
    }

    #[test]
    fn expiry_is_enforced_with_leeway() {
        let auth = hs_authenticator();
        let mut expired = hs_claims("alice");
        expired["exp"] = json!(now() - 120);
        assert_eq!(
            check(&auth, &sign(Algorithm::HS256, None, &expired, &hs_key())).unwrap_err(),
            AuthFailure::Expired
        );
        // Within the default 30 s leeway.
        let mut just_expired = hs_claims("alice");
        just_expired["exp"] = json!(now() - 5);
        check(
            &auth,
            &sign(Algorithm::HS256, None, &just_expired, &hs_key()),
        )
        .unwrap();
        // `exp` is required.
        let mut no_exp = hs_claims("alice");
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            check(&auth, &sign(Algorithm::HS256, None, &no_exp, &hs_key())).unwrap_err(),
            AuthFailure::MissingClaim
        );
    }

    #[test]
    fn not_before_in_the_future_is_refused() {
        let auth = hs_authenticator();
        let mut early = hs_claims("alice");
        early["nbf"] = json!(now() + 600);
        assert_eq!(
            check(&auth, &sign(Algorithm::HS256, None, &early, &hs_key())).unwrap_err(),
            AuthFailure::NotYetValid
        );
        early["nbf"] = json!(now() + 5);
        check(&auth, &sign(Algorithm::HS256, None, &early, &hs_key())).unwrap();
    }

    #[test]
    fn issuer_must_match_when_configured() {
        let auth = hs_authenticator();
        let mut wrong = hs_claims("alice");
        wrong["iss"] = json!("https://evil.test");
        assert_eq!(
            check(&auth, &sign(Algorithm::HS256, None, &wrong, &hs_key())).unwrap_err(),
            AuthFailure::WrongIssuer
        );
        wrong.as_object_mut().unwrap().remove("iss");
        assert_eq!(
            check(&auth, &sign(Algorithm::HS256, None, &wrong, &hs_key())).unwrap_err(),
            AuthFailure::MissingClaim,
            "a configured issuer is required"
        );
    }

    #[test]
    fn audience_must_match_when_configured() {
        let auth = hs_authenticator();
        let mut wrong = hs_claims("alice");
        wrong["aud"] = json!("other-service");
        assert_eq!(
            check(&auth, &sign(Algorithm::HS256, None, &wrong, &hs_key())).unwrap_err(),
            AuthFailure::WrongAudience
        );
        wrong["aud"] = json!(["other-service", "gatehouse"]);
        check(&auth, &sign(Algorithm::HS256, None, &wrong, &hs_key())).unwrap();
        wrong.as_object_mut().unwrap().remove("aud");
        assert_eq!(
            check(&auth, &sign(Algorithm::HS256, None, &wrong, &hs_key())).unwrap_err(),
            AuthFailure::MissingClaim,
            "a configured audience is required"
        );
        // Without a configured audience, `aud` is not checked.
        let open = authenticator(&format!(
            "[auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"{HS_SECRET}\"\n"
        ));
        let mut any = claims("alice");
        any["aud"] = json!("whatever");
        check(&open, &sign(Algorithm::HS256, None, &any, &hs_key())).unwrap();
    }

    #[test]
    fn bad_signature_is_refused() {
        let auth = hs_authenticator();
        let other = EncodingKey::from_secret(b"another-secret-that-is-long-enough");
        assert_eq!(
            check(
                &auth,
                &sign(Algorithm::HS256, None, &hs_claims("alice"), &other)
            )
            .unwrap_err(),
            AuthFailure::BadSignature
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let auth = hs_authenticator();
        let valid = sign(Algorithm::HS256, None, &hs_claims("alice"), &hs_key());
        let (header, rest) = valid.split_once('.').unwrap();
        let (payload, _) = rest.split_once('.').unwrap();
        for token in [
            "abc.def.ghi".to_string(),
            format!("{}.{payload}.sig", b64url(b"not json")),
            // Claims that are not JSON, correctly signed (the signature is checked first).
            sign_raw(header, &b64url(b"not json")),
            // Claims that are JSON but not an object, correctly signed.
            sign_raw(header, &b64url(b"[1,2]")),
            // Signature that is not base64url-decodable (a lone trailing character).
            format!("{header}.{payload}.A"),
        ] {
            assert_eq!(
                check(&auth, &token).unwrap_err(),
                AuthFailure::MalformedToken,
                "{token}"
            );
        }
    }

    /// HS256-signs `header.payload` with the test secret.
    fn sign_raw(header: &str, payload: &str) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(HS_SECRET.as_bytes()).unwrap();
        mac.update(format!("{header}.{payload}").as_bytes());
        format!(
            "{header}.{payload}.{}",
            b64url(&mac.finalize().into_bytes())
        )
    }

    #[test]
    fn crit_header_is_refused() {
        let auth = hs_authenticator();
        let header = b64url(br#"{"alg":"HS256","crit":["exp-ext"],"exp-ext":1}"#);
        let token = sign_raw(&header, &b64url(hs_claims("alice").to_string().as_bytes()));
        assert_eq!(
            check(&auth, &token).unwrap_err(),
            AuthFailure::MalformedToken
        );
    }

    #[test]
    fn key_claim_must_be_a_sane_string() {
        let auth = hs_authenticator();
        let long = "x".repeat(129);
        for sub in [
            json!(42),
            json!(null),
            json!(""),
            json!("has space"),
            json!("tab\t"),
            json!("bidi\u{202e}"),
            json!(long),
        ] {
            let mut claims = hs_claims("alice");
            claims["sub"] = sub.clone();
            assert_eq!(
                check(&auth, &sign(Algorithm::HS256, None, &claims, &hs_key())).unwrap_err(),
                AuthFailure::MissingClaim,
                "{sub}"
            );
        }
        // jsonwebtoken parses `sub` itself and calls a token whose `sub` is an array or an
        // object invalid JSON; it is refused either way, only under another label.
        for sub in [json!(["a"]), json!({ "id": "a" })] {
            let mut claims = hs_claims("alice");
            claims["sub"] = sub;
            assert_eq!(
                check(&auth, &sign(Algorithm::HS256, None, &claims, &hs_key())).unwrap_err(),
                AuthFailure::MalformedToken
            );
        }
        let mut no_sub = hs_claims("alice");
        no_sub.as_object_mut().unwrap().remove("sub");
        assert_eq!(
            check(&auth, &sign(Algorithm::HS256, None, &no_sub, &hs_key())).unwrap_err(),
            AuthFailure::MissingClaim
        );
        for sub in [
            "x".repeat(128),
            "auth0|5f3e".into(),
            "alice@example.com".into(),
            "用户-7".into(),
        ] {
            let mut claims = hs_claims("alice");
            claims["sub"] = json!(sub);
            assert_eq!(
                check(&auth, &sign(Algorithm::HS256, None, &claims, &hs_key()))
                    .unwrap()
                    .key_id,
                sub
            );
        }
    }

    #[test]
    fn kid_selects_the_key() {
        let auth = authenticator(&format!(
            r#"
            [auth.jwt]
            algorithms = ["RS256", "ES256"]
            kid_keys = [
                {{ kid = "rsa-1", public_key_file = "{}" }},
                {{ kid = "ec-1", public_key_file = "{}" }},
            ]
            "#,
            fixture("rsa_test_public.pem"),
            fixture("ec_p256_test_public.pem"),
        ));
        let rs = sign(Algorithm::RS256, Some("rsa-1"), &claims("dave"), &rsa_key());
        assert_eq!(check(&auth, &rs).unwrap().key_id, "dave");
        let es = sign(Algorithm::ES256, Some("ec-1"), &claims("erin"), &ec_key());
        assert_eq!(check(&auth, &es).unwrap().key_id, "erin");
        let unknown = sign(Algorithm::RS256, Some("rsa-2"), &claims("dave"), &rsa_key());
        assert_eq!(check(&auth, &unknown).unwrap_err(), AuthFailure::UnknownKid);
        let no_kid = sign(Algorithm::RS256, None, &claims("dave"), &rsa_key());
        assert_eq!(check(&auth, &no_kid).unwrap_err(), AuthFailure::UnknownKid);
        // An RS256 token naming the EC key: allowed algorithm, wrong key type.
        let crossed = sign(Algorithm::RS256, Some("ec-1"), &claims("dave"), &rsa_key());
        assert_eq!(
            check(&auth, &crossed).unwrap_err(),
            AuthFailure::AlgorithmNotAllowed
        );
    }

    #[test]
    fn kid_without_kid_keys_uses_the_one_key() {
        let auth = authenticator(&public_key_section("[\"RS256\"]", "rsa_test_public.pem"));
        let token = sign(
            Algorithm::RS256,
            Some("whatever"),
            &claims("dave"),
            &rsa_key(),
        );
        assert_eq!(check(&auth, &token).unwrap().key_id, "dave");
    }

    fn load_problems(jwt_section: &str) -> String {
        match Authenticator::from_config(&config(jwt_section)) {
            Ok(_) => panic!("expected problems with {jwt_section}"),
            Err(problems) => problems.join("\n"),
        }
    }

    #[test]
    fn unreadable_key_file_names_setting_and_path() {
        let problems = load_problems(
            "[auth.jwt]\nalgorithms = [\"RS256\"]\npublic_key_file = \"/nonexistent/jwt.pem\"\n",
        );
        assert!(
            problems.starts_with("auth.jwt.public_key_file: cannot read /nonexistent/jwt.pem: "),
            "{problems}"
        );
        let problems = load_problems(
            "[auth.jwt]\nalgorithms = [\"RS256\"]\nkid_keys = [{ kid = \"a\", public_key_file = \"/nonexistent/a.pem\" }]\n",
        );
        assert!(
            problems.starts_with(
                "auth.jwt.kid_keys[0].public_key_file: cannot read /nonexistent/a.pem"
            ),
            "{problems}"
        );
    }

    #[test]
    fn key_type_must_match_the_algorithms() {
        let problems = load_problems(&public_key_section(
            "[\"RS256\"]",
            "ec_p256_test_public.pem",
        ));
        assert!(
            problems.contains(
                "holds an EC public key, but auth.jwt.algorithms [RS256] need an RSA key"
            ),
            "{problems}"
        );
        let problems = load_problems(&public_key_section(
            "[\"ES256\"]",
            "ec_p384_test_public.pem",
        ));
        assert!(
            problems.contains("is not a valid PEM public key for [ES256] (ES256 needs a P-256 key"),
            "{problems}"
        );
        let problems = load_problems(&public_key_section("[\"EdDSA\"]", "rsa_test_public.pem"));
        assert!(problems.contains("need an Ed25519 key"), "{problems}");
        let problems = load_problems(&public_key_section("[\"RS256\"]", "rsa_test_private.pem"));
        assert!(problems.contains("holds a private key"), "{problems}");
        let problems = load_problems(&public_key_section("[\"RS256\"]", "README.md"));
        assert!(
            problems.contains("README.md is not a valid PEM public key for [RS256]"),
            "{problems}"
        );
    }

    #[test]
    fn settings_of_the_other_algorithm_kind_are_reported() {
        let problems = load_problems(&format!(
            "[auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"{HS_SECRET}\"\npublic_key_file = \"{}\"\n",
            fixture("rsa_test_public.pem")
        ));
        assert!(
            problems.contains("auth.jwt.public_key_file: not used by [HS256]"),
            "{problems}"
        );
        let problems = load_problems(&format!(
            "[auth.jwt]\nalgorithms = [\"RS256\"]\nsecret = \"{HS_SECRET}\"\npublic_key_file = \"{}\"\n",
            fixture("rsa_test_public.pem")
        ));
        assert!(
            problems.contains("auth.jwt.secret: not used by [RS256]"),
            "{problems}"
        );
        let problems = load_problems(&format!(
            "[auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"{HS_SECRET}\"\nleeway_s = 999999\n"
        ));
        assert!(problems.contains("auth.jwt.leeway_s"), "{problems}");
    }

    #[test]
    fn snapshot_build_reports_key_problems() {
        let config = config(
            "[auth.jwt]\nalgorithms = [\"RS256\"]\npublic_key_file = \"/nonexistent/jwt.pem\"\n",
        );
        let err = crate::snapshot::Snapshot::build(config)
            .err()
            .expect("refused");
        assert!(
            err.problems[0].contains("auth.jwt.public_key_file"),
            "{err}"
        );
    }

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("eyJh.eyJz."));
        assert!(!looks_like_jwt("eyJh.eyJz"));
        assert!(!looks_like_jwt("eyJh..c2ln"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt("a+b.c.d"));
        assert!(!looks_like_jwt("0123456789abcdef"));
    }
}
