package tenantpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5/pgconn"
)

// Context routing: one *sql.DB (or Pool) for every workspace. Its DSN names
// the database with a {workspace} placeholder, and each checkout goes to the
// workspace its caller's context names.

// WorkspacePlaceholder in the database name of a DSN makes the *sql.DB
// opened with it serve every workspace: each call's database is the name
// with the placeholder replaced by the workspace of the call's context (see
// WithWorkspace), for example postgres://app:pw@db/ws_{workspace}.
const WorkspacePlaceholder = "{workspace}"

// maxIdentifierLen is PostgreSQL's NAMEDATALEN-1: the server truncates a
// longer database name without a word, and would connect to another
// workspace's database if two names share their first 63 bytes.
const maxIdentifierLen = 63

type workspaceKey struct{}

// WithWorkspace returns a context that names workspace id. A *sql.DB or Pool
// opened with a {workspace} DSN serves each call from the database of the
// workspace its context names, for example
//
//	db.QueryContext(tenantpg.WithWorkspace(ctx, "abc"), "SELECT ...")
//	gormDB.WithContext(tenantpg.WithWorkspace(ctx, "abc")).Find(&rows)
//
// Databases opened with a DSN of one database ignore it.
func WithWorkspace(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, workspaceKey{}, id)
}

// WorkspaceFromContext returns the workspace that ctx names, if any.
func WorkspaceFromContext(ctx context.Context) (string, bool) {
	id, ok := ctx.Value(workspaceKey{}).(string)
	return id, ok
}

// router is the driver.Connector of a {workspace} DSN: a connector per
// workspace, made the first time a caller names it and kept while the
// workspace holds backends, or until the map needs a sweep (sweepLocked).
type router struct {
	drv  *Driver
	tmpl *dsnParams // the parsed DSN; its database name holds the placeholder

	// routes maps a workspace id to its *connector. Read without mu on
	// every checkout; written under mu.
	routes sync.Map

	mu      sync.Mutex
	closed  bool // guarded by mu
	count   int  // routes in the map; guarded by mu
	sweepAt int  // count at which the next sweep runs; guarded by mu

	own owner // its handles; guarded by budget.mu
}

// minSweep is the number of routes below which a router keeps every
// workspace it has served: a quiet workspace costs about 1.2 KiB.
const minSweep = 1024

var (
	_ driver.Connector = (*router)(nil)
	_ io.Closer        = (*router)(nil)
)

func (r *router) Driver() driver.Driver { return r.drv }

// Connect returns a handle bound to no workspace yet. database/sql calls
// it with the context of the call that will use the handle first, which
// binds it, so that a *sql.Conn taken with db.Conn(ctx) stays on ctx's
// workspace.
func (r *router) Connect(ctx context.Context) (driver.Conn, error) {
	r.mu.Lock()
	closed := r.closed
	r.mu.Unlock()
	if closed {
		return nil, errDBClosed
	}
	c, err := newHandle(r.drv.b, nil, r, &r.own)
	if err != nil {
		return nil, err
	}
	c.ws, _ = WorkspaceFromContext(ctx)
	return c, nil
}

// connector returns workspace ws's connector, making it on first use.
func (r *router) connector(ctx context.Context, ws string) (*connector, error) {
	if v, ok := r.routes.Load(ws); ok {
		return v.(*connector), nil
	}
	p, err := r.params(ctx, ws)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, errDBClosed
	}
	if v, ok := r.routes.Load(ws); ok {
		return v.(*connector), nil // another caller made it meanwhile
	}
	cn, err := r.drv.newConnector(p)
	if err != nil {
		return nil, err
	}
	r.routes.Store(ws, cn)
	if r.count++; r.count >= max(r.sweepAt, minSweep) {
		r.sweepLocked()
	}
	return cn, nil
}

// sweepLocked forgets the workspaces that hold no backend. It runs each
// time the map has doubled since the last sweep, so its cost per new
// workspace is constant, and the map stays within twice the workspaces that
// hold backends (at most the budget) or minSweep.
func (r *router) sweepLocked() {
	r.routes.Range(func(ws, v any) bool {
		if r.drv.b.releaseIfIdle(v.(*connector).db) {
			r.routes.Delete(ws)
			r.count--
		}
		return true
	})
	r.sweepAt = 2 * r.count
}

// checkout gets a backend of workspace ws. A sweep may forget the
// workspace between the lookup and the checkout (take refuses a forgotten
// database): it is looked up again, made anew.
func (r *router) checkout(ctx context.Context, ws string) (*backend, error) {
	for {
		cn, err := r.connector(ctx, ws)
		if err != nil {
			return nil, err
		}
		be, err := cn.checkout(ctx)
		if err != errDBClosed {
			return be, err
		}
	}
}

// params returns the DSN parameters of workspace ws: the resolver's DSN when
// it gives one, else the template with the placeholder replaced.
func (r *router) params(ctx context.Context, ws string) (*dsnParams, error) {
	if reason := validWorkspace(ws); reason != "" {
		return nil, &DSNError{Reason: "the context's " + reason}
	}
	if resolve := r.drv.resolver(); resolve != nil {
		dsn, err := resolve(ctx, ws)
		if err != nil {
			return nil, fmt.Errorf("tenantpg: workspace %q: resolve: %w", ws, err)
		}
		if dsn != "" {
			p, err := parseDSN(dsn)
			if err != nil {
				var de *DSNError
				if errors.As(err, &de) {
					de.Workspace = ws // the caller knows the id, not the label the DSN may give
				}
				return nil, err
			}
			if p.routed {
				return nil, &DSNError{Workspace: ws, Reason: "the resolver returned a DSN with the " + WorkspacePlaceholder + " placeholder"}
			}
			p.workspace = ws
			return p, nil
		}
	}
	return substitute(r.tmpl, ws)
}

// substitute returns the parameters of workspace ws under tmpl, a parsed
// {workspace} DSN: a copy whose database name has the placeholder replaced.
// The replacement happens after parsing, so that whatever ws holds ends up
// in the database name and nowhere else: no id can name another host, user,
// password or setting, as one spliced into the DSN's text could. ws must
// have passed validWorkspace.
func substitute(tmpl *dsnParams, ws string) (*dsnParams, error) {
	name := strings.ReplaceAll(tmpl.cfg.Database, WorkspacePlaceholder, ws)
	if len(name) > maxIdentifierLen {
		return nil, &DSNError{Workspace: ws, Reason: nameTooLong(len(name))}
	}
	cfg := tmpl.cfg.Copy()
	cfg.Database = name
	p := *tmpl
	p.cfg = cfg
	p.workspace = ws
	p.routed = false
	return &p, nil
}

// ping is the health check of a {workspace} *sql.DB, for a ping that names
// no workspace: whether its server is reachable. It logs in nowhere: the
// DSN names no database without a workspace, and a login to another one
// (postgres, say) would need a privilege the role may lack and a backend
// outside the budget. Instead it answers from the budget's circuit when
// that knows the server is down (the driver's own dials found it
// unreachable, refusing connections, starting up or not answering), and
// otherwise opens a TCP (or Unix socket) connection to the DSN's hosts and
// closes it without a byte: PostgreSQL does not complain of a connection
// that sends nothing (log_connections, when on, records that it came), and
// max_connections does not count it. It cannot tell a server that accepts
// connections but refuses logins (one starting up, say) until the driver's
// own dials have found it so. It changes no state of the circuit. Down, it
// returns a *ServerDownError.
func (r *router) ping(ctx context.Context) error {
	b := r.drv.b
	cfg := r.tmpl.cfg
	start := b.clock.Now()
	timeout := b.timeout()
	if cfg.ConnectTimeout > 0 {
		timeout = min(timeout, cfg.ConnectTimeout)
	}
	if err := b.knownDown(cfg.Host, cfg.Port, cfg.Database, start); err != nil {
		return err
	}

	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// One host: parseDSN refuses DSNs with others, and sslmode=prefer's
	// fallback is the same address.
	network, addr := pgconn.NetworkAddress(cfg.Host, cfg.Port)
	nc, err := cfg.DialFunc(dctx, network, addr)
	if err == nil {
		_ = nc.Close()
		return nil
	}
	return &ServerDownError{Database: cfg.Database, Server: net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port))),
		Waited: b.clock.Now().Sub(start), Err: err, ctxErr: ctx.Err()}
}

// Close closes every workspace's connector: database/sql calls it from
// DB.Close, after closing the idle handles.
func (r *router) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	r.routes.Range(func(_, v any) bool {
		_ = v.(*connector).Close()
		return true
	})
	r.drv.b.closeOwner(nil, &r.own)
	return nil
}
