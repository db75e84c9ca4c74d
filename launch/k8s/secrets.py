"""What counts as a credential on a render command line, by a variable's name and by a value's shape.

A manifest and its "Rendered by" header are plain text that ends up in repositories and CI logs, so a
credential must reach a pod through a Secret (`--secret-env`, `--s3-secret`, `--wandb-secret`). A list
of names always misses one (GITHUB_PAT, HF_AUTH, WANDB_KEY), so values are judged by their shape too:
the prefixes of well-known tokens, connection-string keys (Azure's `AccountKey=`), signature and token
query parameters of presigned URLs, and passwords inside URLs. `--env`/`--set` values that look like
one are refused; the header is redacted by the same rules as a second line of defence.
"""

from __future__ import annotations

import re

REDACTED = "<redacted>"

# Components of a variable name that say it holds a credential: GITHUB_PAT, WANDB_KEY, HF_AUTH, ...
CREDENTIAL_NAME = re.compile(
    r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|PASS|PWD|PAT|AUTH|KEY|APIKEY|CREDENTIALS?|CONNECTION_STRING|SAS"
    r"|SIGNATURE|COOKIE|SESSION)(_|$)",
    re.I,
)
# Tokens recognisable by their prefix: GitHub (classic and fine-grained), Hugging Face, Slack, OpenAI and
# Stripe style `sk-`/`sk_live_`, AWS access key ids, GitLab, Google API keys and OAuth tokens, JWTs.
_TOKEN = re.compile(
    r"(?<![A-Za-z0-9])(gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|hf_[A-Za-z0-9]{20,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|sk-[A-Za-z0-9_-]{20,}|sk_(live|test)_[A-Za-z0-9]{10,}"
    r"|(AKIA|ASIA)[0-9A-Z]{16}|glpat-[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{30,}|ya29\.[0-9A-Za-z_-]{20,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+)"
)
# `key=value` pairs whose value is a credential: connection strings (`;`-separated) and URL queries.
_PAIR = re.compile(
    r"(?<![A-Za-z0-9_-])(AccountKey|SharedAccessKey|SharedAccessSignature|sig|signature|token|access_token"
    r"|id_token|api_key|apikey|key|password|secret|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token"
    r"|X-Goog-Signature|X-Goog-Credential)=([^&;\s]+)",
    re.I,
)
_URL_PASSWORD = re.compile(r"(://[^/@\s:]+:)([^/@\s]+)(@)")


def credential_in(value: str) -> str | None:
    """What in `value` looks like a credential (the kind, never the credential itself), or None."""
    if _TOKEN.search(value):
        return "a token"
    pair = _PAIR.search(value)
    if pair:
        return f"a {pair.group(1)}= value"
    if _URL_PASSWORD.search(value):
        return "a password in a URL"
    return None


def redact(text: str) -> str:
    """`text` with every credential-shaped part replaced by `<redacted>`."""
    text = _TOKEN.sub(REDACTED, text)
    text = _PAIR.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}{m.group(3)}", text)


def redact_argv(argv: list[str]) -> list[str]:
    """A command line fit for a header: values of `--env NAME=...` with a credential's name, and every
    credential-shaped part of any argument, redacted."""
    out = []
    for i, arg in enumerate(argv):
        flag, pair = ("--env=", arg[6:]) if arg.startswith("--env=") else ("", arg)
        name, eq, _ = pair.partition("=")
        if eq and (flag or (i > 0 and argv[i - 1] == "--env")) and CREDENTIAL_NAME.search(name):
            arg = f"{flag}{name}={REDACTED}"
        out.append(redact(arg))
    return out
