package tenantpg

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// dbKey identifies a database on a server as a user sees it: two DSNs with
// the same key share one state, cap and reservation.
type dbKey struct {
	host     string
	port     uint16
	user     string
	database string
}

// DSN parameters tenantpg reads and removes before pgx sees the DSN; pgx
// would send unknown ones to the server as run-time parameters, and the
// server would refuse the connection.
const (
	paramWorkspace = "workspace"
	paramMaxConns  = "pool_max_conns"
	paramReserved  = "pool_reserved_conns"
)

const maxWorkspaceLen = 200

type dsnParams struct {
	cfg       *pgx.ConnConfig
	key       dbKey
	workspace string
	maxConns  int // 0: the driver's per-database default
	reserved  int
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
	if p.maxConns > 0 && p.reserved > p.maxConns {
		return nil, fail(fmt.Sprintf("%s %d exceeds %s %d", paramReserved, p.reserved, paramMaxConns, p.maxConns))
	}
	for k := range rp {
		if strings.HasPrefix(k, "pool_") {
			return nil, fail(fmt.Sprintf("unsupported parameter %s: tenantpg reads %s, %s and %s; other pool settings belong in Config",
				k, paramWorkspace, paramMaxConns, paramReserved))
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
	p.key = dbKey{host: cfg.Host, port: cfg.Port, user: cfg.User, database: cfg.Database}
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
