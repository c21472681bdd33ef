package tenantpg

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// DSN parameters tenantpg reads and removes before pgx sees the DSN; pgx
// would send unknown ones to the server as run-time parameters, and the
// server would refuse the connection.
const (
	paramWorkspace = "workspace"
	paramMaxConns  = "pool_max_conns"
	paramReserved  = "pool_reserved_conns"
	paramReset     = "pool_reset_session"
)

const maxWorkspaceLen = 200

type dsnParams struct {
	cfg       *pgx.ConnConfig
	server    serverKey // whose budget its backends draw on
	workspace string
	maxConns  int // 0: the driver's per-database default
	// resetSession: pool_reset_session=true, a session reset at every
	// check-in (resetSession).
	resetSession bool
	reserved     int
	// routed: the database name holds WorkspacePlaceholder, and the
	// workspace comes from each caller's context.
	routed bool
}

// parseDSN parses a URL or keyword/value DSN. Errors name the workspace when
// it can be read, and never contain the DSN or its password.
func parseDSN(dsn string) (*dsnParams, error) {
	label, secrets := dsnHints(dsn)
	fail := func(reason string) error {
		return &DSNError{Workspace: label, Reason: scrub(reason, dsn, secrets)}
	}
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fail(parseErrorReason(err))
	}
	p := &dsnParams{cfg: cfg, workspace: cfg.Database}
	if validWorkspace(cfg.Database) == "" {
		label = cfg.Database
	}
	rp := cfg.RuntimeParams
	if ws, ok := rp[paramWorkspace]; ok {
		delete(rp, paramWorkspace)
		if err := validWorkspace(ws); err != "" {
			return nil, fail(err)
		}
		p.workspace = ws
	}
	label = p.workspace
	for _, f := range []struct {
		name string
		v    *int
		min  int
	}{{paramMaxConns, &p.maxConns, 1}, {paramReserved, &p.reserved, 0}} {
		s, ok := rp[f.name]
		if !ok {
			continue
		}
		delete(rp, f.name)
		n, err := strconv.Atoi(s)
		if err != nil || n < f.min {
			return nil, fail(fmt.Sprintf("%s must be a whole number of at least %d, got %q", f.name, f.min, s))
		}
		*f.v = n
	}
	if s, ok := rp[paramReset]; ok {
		delete(rp, paramReset)
		v, err := strconv.ParseBool(s)
		if err != nil {
			return nil, fail(fmt.Sprintf("%s must be true or false, got %q", paramReset, s))
		}
		p.resetSession = v
	}
	if p.maxConns > 0 && p.reserved > p.maxConns {
		return nil, fail(fmt.Sprintf("%s %d exceeds %s %d", paramReserved, p.reserved, paramMaxConns, p.maxConns))
	}
	for k := range rp {
		if strings.HasPrefix(k, "pool_") {
			return nil, fail(fmt.Sprintf("unsupported parameter %s: tenantpg reads %s, %s, %s and %s; other pool settings belong in Config",
				k, paramWorkspace, paramMaxConns, paramReserved, paramReset))
		}
	}
	p.routed = strings.Contains(cfg.Database, WorkspacePlaceholder)
	if !p.routed && placeholderIn(dsn) {
		return nil, fail("the " + WorkspacePlaceholder + " placeholder is replaced only in the database name")
	}
	// The server truncates a longer name to its first 63 bytes without a
	// word, onto another workspace's database when the two share them: refused
	// here, so that every path (OpenDB, the resolver's DSN, the registry)
	// refuses it, not only the router's substitution.
	if n := len(cfg.Database) - strings.Count(cfg.Database, WorkspacePlaceholder)*(len(WorkspacePlaceholder)-1); n > maxIdentifierLen {
		if p.routed {
			return nil, fail(fmt.Sprintf("the database name is over %d bytes (PostgreSQL's limit) for any workspace", maxIdentifierLen))
		}
		return nil, fail(nameTooLong(len(cfg.Database)))
	}
	if p.routed {
		if _, ok := cfg.RuntimeParams[paramWorkspace]; ok || p.workspace != cfg.Database {
			return nil, fail("the workspace parameter cannot be used with " + WorkspacePlaceholder + ": the workspace comes from the caller's context")
		}
		if p.reserved > 0 {
			return nil, fail(paramReserved + " cannot be used with " + WorkspacePlaceholder + ": it would reserve connections for every workspace")
		}
	}
	for _, fb := range cfg.Fallbacks {
		// sslmode=prefer adds a fallback to the same host without TLS;
		// another host would be a backend counted against the first
		// host's budget, which the budget cannot move once dialed.
		if fb.Host != cfg.Host || fb.Port != cfg.Port {
			return nil, fail("a DSN with several hosts is not supported: each backend counts against one server's budget, " +
				"and a fallback host's would count against the first host's; open a DSN per host, or name the hosts by one address (a DNS name or a virtual IP)")
		}
	}
	p.server = serverKey{host: cfg.Host, port: cfg.Port}
	return p, nil
}

// placeholderIn reports whether dsn holds WorkspacePlaceholder, escaped
// or not.
func placeholderIn(dsn string) bool {
	return strings.Contains(dsn, WorkspacePlaceholder) || strings.Contains(strings.ToLower(dsn), "%7bworkspace%7d")
}

// nameTooLong is the reason a database name of n bytes is refused.
func nameTooLong(n int) string {
	return fmt.Sprintf("the database name is %d bytes; PostgreSQL truncates names beyond %d, onto any database that shares the first %d",
		n, maxIdentifierLen, maxIdentifierLen)
}

// validWorkspace is the one rule for a workspace id, wherever it enters
// (the registry's DB and CloseWorkspace, a routed DB's WithWorkspace ids,
// which the resolver then gets), and for a DSN's workspace label: not
// empty, at most maxWorkspaceLen bytes, UTF-8, no control character (a NUL
// would end the name in PostgreSQL's start-up packet). Nothing more is
// needed where the id is substituted after parsing, since there it can
// only be a database name, and PostgreSQL takes any other character in
// one; a DSN callback's ids also pass spliceSafe.
func validWorkspace(ws string) string {
	switch {
	case ws == "":
		return "workspace must not be empty"
	case len(ws) > maxWorkspaceLen:
		return fmt.Sprintf("workspace is longer than %d bytes", maxWorkspaceLen)
	case !utf8.ValidString(ws):
		return "workspace is not valid UTF-8"
	case strings.IndexFunc(ws, unicode.IsControl) >= 0:
		return "workspace contains control characters"
	}
	return ""
}

// parseErrorReason describes a pgx parse error without the DSN. pgx's
// ParseConfigError prints the DSN with the password redacted as best it can,
// and may wrap net/url's error, which quotes the raw URL, password and all.
func parseErrorReason(err error) string {
	var pce *pgconn.ParseConfigError
	if !errors.As(err, &pce) {
		return err.Error()
	}
	bare := *pce
	bare.ConnString = ""
	s := strings.TrimPrefix(bare.Error(), "cannot parse ``: ")
	if inner := bare.Unwrap(); inner != nil {
		var ue *url.Error
		if errors.As(inner, &ue) {
			s = strings.Replace(s, inner.Error(), ue.Err.Error(), 1)
		}
	}
	// What pgx quotes is a piece of the DSN, and in a malformed DSN any
	// piece may be a password. A piece may hold quotes itself, so all from
	// the first quote to the last goes.
	return quotedFragment.ReplaceAllString(s, `"…"`)
}

var quotedFragment = regexp.MustCompile(`(?s)".*"`)

var kvParam = regexp.MustCompile(`([A-Za-z_]+)\s*=\s*(?:'((?:[^'\\]|\\.)*)'|(\S*))`)

// dsnHints reads, best effort, the workspace label and any password from a
// DSN that may not parse, so that errors can name the first and never
// contain the second.
func dsnHints(dsn string) (label string, secrets []string) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		if u, err := url.Parse(dsn); err == nil {
			if pw, ok := u.User.Password(); ok {
				secrets = append(secrets, pw)
			}
			q := u.Query()
			secrets = append(secrets, q.Get("password"), q.Get("sslpassword"))
			label = q.Get(paramWorkspace)
			if label == "" {
				label = strings.TrimPrefix(u.Path, "/")
			}
		} else if at := strings.LastIndex(dsn, "@"); at > 0 {
			// Unparseable URL: everything between the scheme and the last
			// '@' may hold the password.
			userinfo := dsn[strings.Index(dsn, "://")+3 : at]
			if i := strings.Index(userinfo, ":"); i >= 0 {
				secrets = append(secrets, userinfo[i+1:])
			}
		}
	} else {
		var db string
		for _, m := range kvParam.FindAllStringSubmatch(dsn, -1) {
			v := m[2] + m[3]
			switch m[1] {
			case "password", "sslpassword":
				secrets = append(secrets, v, m[0])
			case paramWorkspace:
				label = v
			case "dbname":
				db = v
			}
		}
		if label == "" {
			label = db
		}
	}
	if validWorkspace(label) != "" {
		label = ""
	}
	return label, secrets
}

// scrub removes the DSN and any password from an error text.
func scrub(s, dsn string, secrets []string) string {
	if dsn != "" {
		s = strings.ReplaceAll(s, dsn, "[dsn]")
	}
	for _, sec := range secrets {
		if len(sec) >= 3 {
			s = strings.ReplaceAll(s, sec, "[redacted]")
			if esc := url.QueryEscape(sec); esc != sec {
				s = strings.ReplaceAll(s, esc, "[redacted]")
			}
			if esc := url.PathEscape(sec); esc != sec {
				s = strings.ReplaceAll(s, esc, "[redacted]")
			}
		}
	}
	return s
}

// spliceSafe reports why id cannot be handed to a WorkspacesConfig.DSN
// callback, "" if it can. Such a callback typically splices the id into
// the DSN's text, where a character of the DSN's syntax would end the
// database name and start another setting (x?host=evil&sslmode=disable#).
// So ids given to it hold only URL-unreserved ASCII (letters, digits, - . _
// ~) and non-ASCII characters other than spaces: nothing that ends a URL's
// path or a keyword/value's value, in any position. It adds to
// validWorkspace, which every id passes.
func spliceSafe(id string) string {
	for _, r := range id {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9',
			r == '-', r == '.', r == '_', r == '~':
		case r >= utf8.RuneSelf && !unicode.IsSpace(r) && !unicode.IsControl(r):
		default:
			return fmt.Sprintf("workspace contains %q, which a DSN callback could splice into the DSN's syntax; use WorkspacesConfig.Pattern for such ids", r)
		}
	}
	return ""
}

// workspaceIDError is the error for an id that validWorkspace or spliceSafe
// refused. It names the id, clipped, since the id is what the caller must
// fix.
func workspaceIDError(id, reason string) error {
	if len(id) > 64 {
		id = strings.ToValidUTF8(id[:64], "") + "…"
	}
	return &DSNError{Workspace: id, Reason: reason}
}

// spliceDSN writes p's database name (tmpl's with the placeholder replaced)
// into pattern, the text tmpl was parsed from: for a WorkspacesConfig.Open
// hook, which takes a DSN string. The id is escaped for the DSN's syntax,
// and the result is parsed again and must differ from tmpl in the database
// name alone: an id the escaping does not cover (a space in an unquoted
// keyword/value) is refused rather than allowed to change anything else.
func spliceDSN(pattern string, tmpl, p *dsnParams) (string, error) {
	id := p.workspace
	var dsn string
	if strings.HasPrefix(pattern, "postgres://") || strings.HasPrefix(pattern, "postgresql://") {
		esc := escapeAll(id)
		dsn = strings.ReplaceAll(pattern, WorkspacePlaceholder, esc)
		dsn = escapedPlaceholder.ReplaceAllLiteralString(dsn, esc)
	} else {
		dsn = strings.ReplaceAll(pattern, WorkspacePlaceholder, strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(id))
	}
	got, err := parseDSN(dsn)
	if err != nil || got.cfg.Database != p.cfg.Database || !sameButDatabase(got.cfg, tmpl.cfg) ||
		got.maxConns != tmpl.maxConns || got.reserved != tmpl.reserved {
		return "", &DSNError{Workspace: id, Reason: "the id cannot be written into WorkspacesConfig.Pattern for the Open hook without changing more than the database name"}
	}
	return dsn, nil
}

var escapedPlaceholder = regexp.MustCompile(`(?i)%7bworkspace%7d`)

// escapeAll percent-encodes every byte of s but URL-unreserved ASCII, so
// that s means itself in a URL's path and in its query alike.
func escapeAll(s string) string {
	const hex = "0123456789ABCDEF"
	var sb strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~' {
			sb.WriteByte(c)
			continue
		}
		sb.WriteByte('%')
		sb.WriteByte(hex[c>>4])
		sb.WriteByte(hex[c&15])
	}
	return sb.String()
}

// sameButDatabase reports whether a and b connect alike but for the
// database name: the same servers, credentials, TLS, run-time parameters
// and pgx settings, as far as a DSN can set them.
func sameButDatabase(a, b *pgx.ConnConfig) bool {
	if a.Host != b.Host || a.Port != b.Port || a.User != b.User || a.Password != b.Password ||
		a.ConnectTimeout != b.ConnectTimeout || a.KerberosSrvName != b.KerberosSrvName || a.KerberosSpn != b.KerberosSpn ||
		a.SSLNegotiation != b.SSLNegotiation || a.SSLCertMode != b.SSLCertMode || a.ChannelBinding != b.ChannelBinding ||
		a.RequireAuth != b.RequireAuth || a.MinProtocolVersion != b.MinProtocolVersion || a.MaxProtocolVersion != b.MaxProtocolVersion ||
		a.StatementCacheCapacity != b.StatementCacheCapacity || a.DescriptionCacheCapacity != b.DescriptionCacheCapacity ||
		a.DefaultQueryExecMode != b.DefaultQueryExecMode ||
		(a.ValidateConnect == nil) != (b.ValidateConnect == nil) || (a.AfterConnect == nil) != (b.AfterConnect == nil) ||
		!maps.Equal(a.RuntimeParams, b.RuntimeParams) || !sameTLS(a.TLSConfig, b.TLSConfig) || len(a.Fallbacks) != len(b.Fallbacks) {
		return false
	}
	for i, fa := range a.Fallbacks {
		fb := b.Fallbacks[i]
		if fa.Host != fb.Host || fa.Port != fb.Port || !sameTLS(fa.TLSConfig, fb.TLSConfig) {
			return false
		}
	}
	return true
}

func sameTLS(a, b *tls.Config) bool {
	if a == nil || b == nil {
		return a == b
	}
	if a.ServerName != b.ServerName || a.InsecureSkipVerify != b.InsecureSkipVerify ||
		a.MinVersion != b.MinVersion || a.MaxVersion != b.MaxVersion || !a.RootCAs.Equal(b.RootCAs) ||
		(a.VerifyPeerCertificate == nil) != (b.VerifyPeerCertificate == nil) ||
		(a.VerifyConnection == nil) != (b.VerifyConnection == nil) ||
		(a.KeyLogWriter == nil) != (b.KeyLogWriter == nil) || len(a.Certificates) != len(b.Certificates) {
		return false
	}
	for i, ca := range a.Certificates {
		if !slices.EqualFunc(ca.Certificate, b.Certificates[i].Certificate, bytes.Equal) {
			return false
		}
	}
	return true
}
