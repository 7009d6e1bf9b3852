//! Authentication: who a request comes from, from its bearer JWT.
//!
//! `--auth jwt` checks `Authorization: Bearer <JWT>` against one configured
//! key — an HS256 secret (`AUTH_JWT_SECRET`), an RS256 / ES256 public key
//! in PEM (`AUTH_JWT_PUBLIC_KEY_FILE`) or a JWKS file (`AUTH_JWKS_FILE`, the
//! token's `kid` picks the key). Only the configured key's algorithm is
//! accepted (so never `none`); `exp` is required (30 s leeway), `nbf`
//! honoured, `iss` / `aud` checked when configured. `sub` is the caller's
//! user id; the roles claim (`roles`, or `AUTH_ROLES_CLAIM`) holding
//! `operator` makes an operator, anything else a customer.
//!
//! `--auth none` trusts every caller as an operator: for a laptop, and
//! refused on a non-loopback address unless `--allow-anonymous` is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use order_saga_graphql::Caller;
use serde_json::{Map, Value};

/// Seconds of clock difference allowed on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// The role that may do everything.
pub const OPERATOR_ROLE: &str = "operator";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every API request carries `Authorization: Bearer <JWT>`.
    Jwt,
    /// No authentication: every caller is trusted as an operator.
    None,
}

/// `serve`'s authentication settings.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// jwt: every API request needs a bearer JWT (see the AUTH_* settings);
    /// none: no authentication, every caller is an operator — allowed on a
    /// non-loopback HTTP_ADDR only with --allow-anonymous.
    #[arg(long = "auth", env = "AUTH_MODE", value_enum, default_value = "none")]
    pub mode: AuthMode,
    /// HS256 shared secret for --auth jwt.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// RS256 or ES256 (P-256) public key in PEM for --auth jwt.
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// A JWKS file (RSA and EC keys) for --auth jwt; the token's `kid`
    /// picks the key.
    #[arg(long, env = "AUTH_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    #[command(flatten)]
    pub claims: ClaimArgs,
    /// Serve --auth none on a non-loopback HTTP_ADDR anyway (logs a warning).
    #[arg(long, env = "ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,
}

impl Default for AuthArgs {
    fn default() -> Self {
        AuthArgs {
            mode: AuthMode::None,
            jwt_secret: None,
            jwt_public_key_file: None,
            jwks_file: None,
            claims: ClaimArgs::default(),
            allow_anonymous: false,
        }
    }
}

/// The claims both the service checks and `order-saga token` writes.
#[derive(Debug, Clone, clap::Args)]
pub struct ClaimArgs {
    /// The `iss` tokens carry (checked by serve when set).
    #[arg(long, env = "AUTH_ISSUER")]
    pub issuer: Option<String>,
    /// The `aud` tokens carry (checked by serve when set).
    #[arg(long, env = "AUTH_AUDIENCE")]
    pub audience: Option<String>,
    /// The claim holding the caller's roles (an array of strings).
    #[arg(long, env = "AUTH_ROLES_CLAIM", default_value = "roles")]
    pub roles_claim: String,
}

impl Default for ClaimArgs {
    fn default() -> Self {
        ClaimArgs {
            issuer: None,
            audience: None,
            roles_claim: "roles".into(),
        }
    }
}

/// Why the settings cannot start the service; names the setting.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("AUTH_MODE=none on the non-loopback HTTP_ADDR {0}: anyone on the network could act as an operator; use --auth jwt, or --allow-anonymous (ALLOW_ANONYMOUS) to accept that")]
    AnonymousOnNetwork(SocketAddr),
    #[error("AUTH_MODE=jwt needs a key: set AUTH_JWT_SECRET, AUTH_JWT_PUBLIC_KEY_FILE or AUTH_JWKS_FILE")]
    NoKey,
    #[error(
        "AUTH_JWT_SECRET, AUTH_JWT_PUBLIC_KEY_FILE and AUTH_JWKS_FILE exclude each other: set one"
    )]
    SeveralKeys,
    #[error("AUTH_JWT_SECRET: must not be empty")]
    EmptySecret,
    #[error("{setting}: cannot read {path}: {reason}")]
    Unreadable {
        setting: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{setting}: {path} holds no usable key: {reason}")]
    BadKey {
        setting: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// What was wrong with a request's credentials (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unauthenticated(pub String);

/// One verification key and the only algorithm it accepts.
struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Checks requests' credentials.
pub struct Authenticator {
    keys: Option<Vec<Key>>,
    issuer: Option<String>,
    audience: Option<String>,
    roles_claim: String,
}

impl Default for Authenticator {
    fn default() -> Self {
        Authenticator::none()
    }
}

impl Authenticator {
    /// No authentication: every caller is [`Caller::Anonymous`].
    pub fn none() -> Self {
        Authenticator {
            keys: None,
            issuer: None,
            audience: None,
            roles_claim: "roles".into(),
        }
    }

    /// HS256 with `secret` (tests and `token`), other settings as `args`.
    pub fn hs256(secret: &str, args: &AuthArgs) -> Self {
        Authenticator {
            keys: Some(vec![Key {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            }]),
            issuer: args.claims.issuer.clone(),
            audience: args.claims.audience.clone(),
            roles_claim: args.claims.roles_claim.clone(),
        }
    }

    /// From `serve`'s settings; `http_addr` is where the API listens.
    pub fn from_args(args: &AuthArgs, http_addr: SocketAddr) -> Result<Self, AuthConfigError> {
        let keys = match args.mode {
            AuthMode::None => {
                if !http_addr.ip().is_loopback() {
                    if !args.allow_anonymous {
                        return Err(AuthConfigError::AnonymousOnNetwork(http_addr));
                    }
                    tracing::warn!(%http_addr, "serving without authentication on a non-loopback address (--allow-anonymous): every caller is an operator");
                }
                return Ok(Authenticator::none());
            }
            AuthMode::Jwt => match (&args.jwt_secret, &args.jwt_public_key_file, &args.jwks_file) {
                (None, None, None) => return Err(AuthConfigError::NoKey),
                (Some(secret), None, None) => {
                    if secret.is_empty() {
                        return Err(AuthConfigError::EmptySecret);
                    }
                    vec![Key {
                        kid: None,
                        algorithm: Algorithm::HS256,
                        key: DecodingKey::from_secret(secret.as_bytes()),
                    }]
                }
                (None, Some(path), None) => vec![pem_key(path)?],
                (None, None, Some(path)) => jwks_keys(path)?,
                _ => return Err(AuthConfigError::SeveralKeys),
            },
        };
        Ok(Authenticator {
            keys: Some(keys),
            issuer: args.claims.issuer.clone(),
            audience: args.claims.audience.clone(),
            roles_claim: args.claims.roles_claim.clone(),
        })
    }

    /// Whether requests must carry a token.
    pub fn required(&self) -> bool {
        self.keys.is_some()
    }

    /// The caller of a request whose `Authorization` header is `header`.
    pub fn caller(&self, header: Option<&[u8]>) -> Result<Caller, Unauthenticated> {
        let Some(keys) = &self.keys else {
            return Ok(Caller::Anonymous);
        };
        let refuse = |why: &str| Err(Unauthenticated(why.to_string()));
        let Some(header) = header else {
            return refuse("no credentials: send Authorization: Bearer <JWT>");
        };
        let Ok(header) = std::str::from_utf8(header) else {
            return refuse("the Authorization header is not text");
        };
        let token = match header.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return refuse("the Authorization header is not 'Bearer <JWT>'"),
        };
        self.verify(keys, token)
    }

    fn verify(&self, keys: &[Key], token: &str) -> Result<Caller, Unauthenticated> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::Json(e) => Unauthenticated(format!(
                "the token's header is not acceptable (alg `none` and unknown algorithms are refused): {e}"
            )),
            _ => Unauthenticated(format!("the token is not a JWT: {e}")),
        })?;
        let key = keys
            .iter()
            .find(|k| keys.len() == 1 || (k.kid.is_some() && k.kid == header.kid))
            .ok_or_else(|| {
                Unauthenticated(match &header.kid {
                    Some(kid) => format!("no key with kid '{kid}' in AUTH_JWKS_FILE"),
                    None => "the token names no key (kid) of AUTH_JWKS_FILE".to_string(),
                })
            })?;
        if header.alg != key.algorithm {
            return Err(Unauthenticated(format!(
                "the token is signed with {:?}; only {:?} is accepted",
                header.alg, key.algorithm
            )));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|e| Unauthenticated(rejection(e.kind())))?
            .claims;
        let user_id = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            _ => return Err(Unauthenticated("the token's sub is not a user id".into())),
        };
        let roles = match claims.get(&self.roles_claim) {
            None => Vec::new(),
            Some(Value::Array(roles)) => roles
                .iter()
                .map(Value::as_str)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.bad_roles())?,
            Some(_) => return Err(self.bad_roles()),
        };
        Ok(if roles.contains(&OPERATOR_ROLE) {
            Caller::Operator { subject: user_id }
        } else {
            Caller::Customer { user_id }
        })
    }

    fn bad_roles(&self) -> Unauthenticated {
        Unauthenticated(format!(
            "the token's {} claim is not an array of strings",
            self.roles_claim
        ))
    }
}

/// What a failed check tells the caller (never the token itself).
fn rejection(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired (exp)".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
        ErrorKind::InvalidIssuer => "the token's issuer (iss) is not the configured one".into(),
        ErrorKind::InvalidAudience => "the token's audience (aud) is not the configured one".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
        ErrorKind::InvalidAlgorithm => "the token's algorithm is not accepted".into(),
        other => format!("the token is not valid: {other:?}"),
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, AuthConfigError> {
    std::fs::read(path).map_err(|e| AuthConfigError::Unreadable {
        setting,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// An RS256 or ES256 public key in PEM.
fn pem_key(path: &Path) -> Result<Key, AuthConfigError> {
    const SETTING: &str = "AUTH_JWT_PUBLIC_KEY_FILE";
    let pem = read(SETTING, path)?;
    let (algorithm, key) = match DecodingKey::from_rsa_pem(&pem) {
        Ok(key) => (Algorithm::RS256, key),
        Err(_) => (
            Algorithm::ES256,
            DecodingKey::from_ec_pem(&pem).map_err(|e| AuthConfigError::BadKey {
                setting: SETTING,
                path: path.to_path_buf(),
                reason: format!("not an RSA or EC public key in PEM: {e}"),
            })?,
        ),
    };
    Ok(Key {
        kid: None,
        algorithm,
        key,
    })
}

/// The RSA and EC keys of a JWKS file.
fn jwks_keys(path: &Path) -> Result<Vec<Key>, AuthConfigError> {
    const SETTING: &str = "AUTH_JWKS_FILE";
    let bad = |reason: String| AuthConfigError::BadKey {
        setting: SETTING,
        path: path.to_path_buf(),
        reason,
    };
    let set: JwkSet = serde_json::from_slice(&read(SETTING, path)?)
        .map_err(|e| bad(format!("not a JWKS: {e}")))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P384 => {
                Algorithm::ES384
            }
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            algorithm,
            key,
        });
    }
    if keys.is_empty() {
        return Err(bad("no RSA or EC (P-256, P-384) key".into()));
    }
    Ok(keys)
}

/// `order-saga token`: an HS256 token for development and tests.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The caller's user id (the `sub` claim).
    #[arg(long)]
    pub sub: String,
    /// A role for the roles claim (repeatable); `operator` may do everything.
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// The HS256 secret the service checks.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// How long the token is valid (`exp`).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: std::time::Duration,
    #[command(flatten)]
    pub claims: ClaimArgs,
}

impl TokenArgs {
    /// A token for `sub` with `roles` and nothing else set.
    pub fn new(secret: &str, sub: &str, roles: &[&str]) -> Self {
        TokenArgs {
            sub: sub.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            secret: secret.into(),
            ttl: std::time::Duration::from_secs(3600),
            claims: ClaimArgs::default(),
        }
    }

    /// The signed token.
    pub fn mint(&self) -> Result<String, jsonwebtoken::errors::Error> {
        let now = jsonwebtoken::get_current_timestamp();
        let mut claims = Map::new();
        claims.insert("sub".into(), self.sub.clone().into());
        claims.insert("iat".into(), now.into());
        claims.insert("exp".into(), (now + self.ttl.as_secs()).into());
        claims.insert(self.claims.roles_claim.clone(), self.roles.clone().into());
        if let Some(issuer) = &self.claims.issuer {
            claims.insert("iss".into(), issuer.clone().into());
        }
        if let Some(audience) = &self.claims.audience {
            claims.insert("aud".into(), audience.clone().into());
        }
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(self.secret.as_bytes()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "unit-test-secret";
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/auth");

    fn fixture(name: &str) -> PathBuf {
        Path::new(FIXTURES).join(name)
    }

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().expect("address")
    }

    fn jwt(args: AuthArgs) -> Result<Authenticator, AuthConfigError> {
        Authenticator::from_args(
            &AuthArgs {
                mode: AuthMode::Jwt,
                ..args
            },
            loopback(),
        )
    }

    fn claims(sub: &str) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        serde_json::json!({"sub": sub, "exp": now + 600, "roles": []})
    }

    fn sign(header: Header, claims: &Value, key: &EncodingKey) -> String {
        jsonwebtoken::encode(&header, claims, key).expect("sign")
    }

    fn hs(claims: &Value) -> String {
        sign(
            Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
    }

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    fn refusal(auth: &Authenticator, token: &str) -> String {
        auth.caller(Some(&bearer(token))).expect_err("refused").0
    }

    fn secret_args() -> AuthArgs {
        AuthArgs {
            jwt_secret: Some(SECRET.into()),
            ..AuthArgs::default()
        }
    }

    #[test]
    fn a_valid_token_names_a_customer_or_an_operator() {
        let auth = jwt(secret_args()).expect("config");
        assert_eq!(
            auth.caller(Some(&bearer(&hs(&claims("u-1"))))),
            Ok(Caller::Customer {
                user_id: "u-1".into()
            })
        );
        let mut operator = claims("ops");
        operator["roles"] = serde_json::json!(["reader", "operator"]);
        assert_eq!(
            auth.caller(Some(&bearer(&hs(&operator)))),
            Ok(Caller::Operator {
                subject: "ops".into()
            })
        );
    }

    #[test]
    fn bad_credentials_are_refused_saying_why() {
        let auth = jwt(AuthArgs {
            claims: ClaimArgs {
                issuer: Some("https://id.test".into()),
                audience: Some("order-saga".into()),
                ..ClaimArgs::default()
            },
            ..secret_args()
        })
        .expect("config");
        let good = || {
            let mut c = claims("u-1");
            c["iss"] = "https://id.test".into();
            c["aud"] = "order-saga".into();
            c
        };
        assert!(auth.caller(Some(&bearer(&hs(&good())))).is_ok());
        let now = jsonwebtoken::get_current_timestamp();
        let with = |key: &str, value: Value| {
            let mut c = good();
            c[key] = value;
            hs(&c)
        };
        let without = |key: &str| {
            let mut c = good();
            c.as_object_mut().expect("object").remove(key);
            hs(&c)
        };
        let cases = [
            (with("exp", (now - 120).into()), "expired"),
            (with("nbf", (now + 120).into()), "not valid yet"),
            (with("iss", "https://evil.test".into()), "issuer"),
            (with("aud", "someone-else".into()), "audience"),
            (without("exp"), "exp"),
            (without("sub"), "sub"),
            (with("sub", "".into()), "sub"),
            (with("roles", "operator".into()), "roles"),
            (
                sign(
                    Header::new(Algorithm::HS256),
                    &good(),
                    &EncodingKey::from_secret(b"another secret"),
                ),
                "signature",
            ),
            ("not-a-jwt".into(), "not a JWT"),
        ];
        for (token, why) in cases {
            let message = refusal(&auth, &token);
            assert!(message.contains(why), "{why}: {message}");
            assert!(!message.contains(&token), "the token is not echoed");
        }
        // Expired within the leeway still passes.
        assert!(auth
            .caller(Some(&bearer(&with("exp", (now - 5).into()))))
            .is_ok());
        for header in [None, Some(b"Basic dTpw".to_vec()), Some(b"Bearer".to_vec())] {
            assert!(auth.caller(header.as_deref()).is_err());
        }
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let auth = jwt(secret_args()).expect("config");
        // {"alg":"none","typ":"JWT"} . {"sub":"u-1","exp":9999999999} . (no signature)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1LTEiLCJleHAiOjk5OTk5OTk5OTl9.";
        assert!(refusal(&auth, none).contains("none"));
        let hs384 = sign(
            Header::new(Algorithm::HS384),
            &claims("u-1"),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        );
        assert!(refusal(&auth, &hs384).contains("only HS256"));
    }

    fn pem_signer(name: &str, algorithm: Algorithm) -> EncodingKey {
        let pem = std::fs::read(fixture(name)).expect("fixture");
        match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).expect("rsa key"),
            _ => EncodingKey::from_ec_pem(&pem).expect("ec key"),
        }
    }

    #[test]
    fn public_keys_in_pem_verify_rs256_and_es256() {
        for (public, private, algorithm) in [
            ("rs256.pub.pem", "rs256.key.pem", Algorithm::RS256),
            ("es256.pub.pem", "es256.key.pem", Algorithm::ES256),
        ] {
            let auth = jwt(AuthArgs {
                jwt_public_key_file: Some(fixture(public)),
                ..AuthArgs::default()
            })
            .expect("config");
            let signer = pem_signer(private, algorithm);
            let token = sign(Header::new(algorithm), &claims("u-1"), &signer);
            assert!(auth.caller(Some(&bearer(&token))).is_ok(), "{public}");
            // A token HS256-signed with the public key as secret: refused.
            let pem = std::fs::read(fixture(public)).expect("fixture");
            let confused = sign(
                Header::new(Algorithm::HS256),
                &claims("u-1"),
                &EncodingKey::from_secret(&pem),
            );
            assert!(refusal(&auth, &confused).contains("HS256"), "{public}");
        }
    }

    #[test]
    fn a_jwks_file_picks_the_key_by_kid() {
        let auth = jwt(AuthArgs {
            jwks_file: Some(fixture("jwks.json")),
            ..AuthArgs::default()
        })
        .expect("config");
        for (kid, private, algorithm) in [
            ("ec-1", "es256.key.pem", Algorithm::ES256),
            ("rsa-1", "rs256.key.pem", Algorithm::RS256),
        ] {
            let mut header = Header::new(algorithm);
            header.kid = Some(kid.into());
            let token = sign(header, &claims("u-1"), &pem_signer(private, algorithm));
            assert!(auth.caller(Some(&bearer(&token))).is_ok(), "{kid}");
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("unknown".into());
        let token = sign(
            header,
            &claims("u-1"),
            &pem_signer("es256.key.pem", Algorithm::ES256),
        );
        assert!(refusal(&auth, &token).contains("kid 'unknown'"));
    }

    #[test]
    fn start_up_refusals_name_the_setting() {
        let network: SocketAddr = "0.0.0.0:8080".parse().expect("address");
        let anonymous = Authenticator::from_args(&AuthArgs::default(), network);
        assert!(matches!(
            anonymous,
            Err(AuthConfigError::AnonymousOnNetwork(_))
        ));
        assert!(anonymous
            .err()
            .is_some_and(|e| e.to_string().contains("--allow-anonymous")));
        let allowed = AuthArgs {
            allow_anonymous: true,
            ..AuthArgs::default()
        };
        assert!(Authenticator::from_args(&allowed, network).is_ok());

        let message = |args: AuthArgs| jwt(args).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message(AuthArgs::default()).contains("AUTH_JWT_SECRET"));
        let missing = AuthArgs {
            jwt_public_key_file: Some("/nonexistent/key.pem".into()),
            ..AuthArgs::default()
        };
        assert!(message(missing).contains("AUTH_JWT_PUBLIC_KEY_FILE: cannot read"));
        let not_a_key = AuthArgs {
            jwt_public_key_file: Some(fixture("jwks.json")),
            ..AuthArgs::default()
        };
        assert!(message(not_a_key).contains("AUTH_JWT_PUBLIC_KEY_FILE"));
        let not_a_jwks = AuthArgs {
            jwks_file: Some(fixture("es256.pub.pem")),
            ..AuthArgs::default()
        };
        assert!(message(not_a_jwks).contains("AUTH_JWKS_FILE"));
        let both = AuthArgs {
            jwks_file: Some(fixture("jwks.json")),
            ..secret_args()
        };
        assert!(message(both).contains("exclude each other"));
    }

    #[test]
    fn the_token_command_mints_what_the_service_accepts() {
        let auth = jwt(secret_args()).expect("config");
        let token = TokenArgs::new(SECRET, "ops", &["operator"])
            .mint()
            .expect("mint");
        assert_eq!(
            auth.caller(Some(&bearer(&token))),
            Ok(Caller::Operator {
                subject: "ops".into()
            })
        );
    }
}
