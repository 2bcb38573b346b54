/**
 * Credentials out of URLs and text, before they reach a log line, an event,
 * a checkpoint, an API answer or an error message.
 *
 *   redactUrl('nats://alice:s3cret@10.0.0.5:4222')   nats://alice:***@10.0.0.5:4222
 *   redactUrl('nats://TOKEN@a:4222,nats://b:4222')    nats://***@a:4222,nats://b:4222
 *   redactUrl('http://h:8080/?token=abc&after=3')     http://h:8080/?token=***&after=3
 *   redactText('cannot reach https://u:p@h/x: refused') cannot reach https://u:***@h/x: refused
 *
 * A user name followed by a password keeps the name (it says who connected);
 * a user name alone is treated as a token (nats://TOKEN@host) and hidden.
 * Written by hand: the rules are a few regular expressions, and they must also
 * cover strings that are not valid URLs.
 */

export const REDACTED = '***';

/** Query parameters whose values are secrets. */
const SECRET_PARAM = '(?:token|access_token|auth|authorization|password|passwd|pass|pwd|secret|api_key|apikey|key|jwt|nkey|seed|sig|signature)';
const QUERY_SECRET = new RegExp(`([?&;]${SECRET_PARAM}=)[^&#;\\s"'<>]*`, 'gi');
/** scheme://USERINFO@ in free text; userinfo may hold an unencoded '@', so take up to the last one before the path. */
const TEXT_USERINFO = /\b([a-z][a-z0-9+.-]*:\/\/)([^\s/?#"'<>]*)@/gi;

function hideUserinfo(userinfo: string): string {
  const colon = userinfo.indexOf(':');
  return colon > 0 ? `${userinfo.slice(0, colon)}:${REDACTED}` : REDACTED;
}

function redactOne(entry: string): string {
  let s = entry;
  const scheme = /^([a-z][a-z0-9+.-]*:\/\/)/i.exec(s)?.[1] ?? '';
  const rest = s.slice(scheme.length);
  const end = rest.search(/[/?#]/);
  const authority = end < 0 ? rest : rest.slice(0, end);
  const at = authority.lastIndexOf('@');
  if (at >= 0) s = `${scheme}${hideUserinfo(authority.slice(0, at))}${rest.slice(at)}`;
  return s.replace(QUERY_SECRET, `$1${REDACTED}`);
}

/**
 * A URL, or a comma-separated list of them (how NATS servers are given), with
 * passwords, tokens in the user part and secret query values replaced by ***.
 * Entries without a scheme (user:pass@host:4222) are covered too.
 */
export function redactUrl(url: string): string {
  return url
    .split(',')
    .map((part) => {
      const lead = /^\s*/.exec(part)![0];
      return lead + redactOne(part.slice(lead.length));
    })
    .join(',');
}

/** Free text (an error message, a log line) with every scheme://user:pass@ and secret query value in it redacted. */
export function redactText(text: string): string {
  return text.replace(TEXT_USERINFO, (_m, scheme: string, userinfo: string) => `${scheme}${hideUserinfo(userinfo)}@`).replace(QUERY_SECRET, `$1${REDACTED}`);
}

/** Whether a URL (or list of them) carries credentials that redactUrl would hide. */
export function hasUrlCredentials(url: string): boolean {
  return redactUrl(url) !== url;
}
