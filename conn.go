package tenantpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"runtime"

	"github.com/jackc/pgx/v5"
)

// conn is a handle: what database/sql holds as a connection. It takes a
// backend of its database when database/sql starts using it (ResetSession,
// or the first call on a new handle) and gives it back when database/sql
// takes it back (IsValid). A transaction, a *sql.Conn, open Rows and Raw
// keep their backend for as long as database/sql holds the handle; between
// two checkouts the handle may get another backend, which database/sql
// never promised otherwise.
//
// database/sql serialises its calls on one connection, so the fields need
// no lock.
type conn struct {
	b *budget
	// A handle serves one database (fixed) or, under a {workspace} DSN,
	// the workspace each checkout's context names (router).
	fixed  *connector
	router *router
	// ws is the workspace a router's handle is on for the current
	// database/sql checkout: named by the context of Connect or
	// ResetSession, or of the first call. Calls that name another fail.
	ws string

	be *backend // nil between checkouts
	// pending is a checkout that failed in ResetSession. database/sql
	// ignores every ResetSession error but ErrBadConn and hands the handle
	// out anyway; the error goes to the first call instead of a second wait.
	pending error
	closed  bool

	// hold mirrors be for the cleanup that reclaims the backend of a handle
	// dropped without a check-in (reclaim.go), and what the handle retained.
	hold    *hold
	cleanup runtime.Cleanup
}

var (
	_ driver.Conn               = (*conn)(nil)
	_ driver.ConnBeginTx        = (*conn)(nil)
	_ driver.ConnPrepareContext = (*conn)(nil)
	_ driver.ExecerContext      = (*conn)(nil)
	_ driver.QueryerContext     = (*conn)(nil)
	_ driver.Pinger             = (*conn)(nil)
	_ driver.SessionResetter    = (*conn)(nil)
	_ driver.Validator          = (*conn)(nil)
	_ driver.NamedValueChecker  = (*conn)(nil)
)

// backend returns the handle's backend, checking one out on first use.
func (c *conn) backend(ctx context.Context) (*backend, error) {
	if c.router != nil {
		if err := c.bind(ctx); err != nil {
			return nil, err
		}
	}
	if be := c.be; be != nil {
		return be, nil
	}
	if err := c.pending; err != nil {
		c.pending = nil
		return nil, err
	}
	var be *backend
	var err error
	if c.router == nil {
		be, err = c.fixed.checkout(ctx)
	} else {
		be, err = c.router.checkout(ctx, c.ws)
	}
	if err != nil {
		return nil, err
	}
	c.be = be
	c.hold.be.Store(be)
	return be, nil
}

// bind puts a router's handle on the workspace ctx names, or checks that
// the handle is already on it.
func (c *conn) bind(ctx context.Context) error {
	ws, ok := WorkspaceFromContext(ctx)
	switch {
	case !ok && c.ws == "":
		return ErrNoWorkspace
	case !ok || ws == c.ws:
		return nil
	case c.ws == "":
		c.ws = ws
		return nil
	}
	return &WorkspaceMismatchError{Bound: c.ws, Requested: ws}
}

// ResetSession is database/sql's checkout of the handle, with the caller's
// context.
func (c *conn) ResetSession(ctx context.Context) error {
	if c.be != nil {
		return nil
	}
	if c.router != nil {
		if c.ws, _ = WorkspaceFromContext(ctx); c.ws == "" {
			return nil // the first call names it
		}
	}
	if _, err := c.backend(ctx); err != nil {
		c.pending = err
	}
	return nil
}

// IsValid is database/sql's check-in: the backend goes back to the driver.
// The handle stays valid until the driver is closed.
func (c *conn) IsValid() bool {
	c.pending = nil
	c.ws = ""
	if be := c.be; be != nil {
		c.be = nil
		c.hold.be.Store(nil)
		c.b.giveBack(be)
	}
	return !c.b.shut.Load()
}

func (c *conn) Close() error {
	if c.closed {
		return nil
	}
	c.closed = true
	c.pending = nil
	c.cleanup.Stop()
	if be := c.be; be != nil {
		// Closed without a check-in: after an error database/sql judged
		// fatal, or when the *sql.DB closes under a caller. The check-in
		// closes a backend that is broken or inside a transaction.
		c.be = nil
		c.hold.be.Store(nil)
		c.b.giveBack(be)
	}
	c.b.release(c.hold.db, c.hold.own)
	return nil
}

func (c *conn) Prepare(query string) (driver.Stmt, error) {
	return c.PrepareContext(context.Background(), query)
}

// PrepareContext checks the statement on the current backend and returns a
// statement that runs on whichever backend the handle holds when it is
// executed. pgx's statement cache prepares it on each backend the first
// time it runs there, so nothing is left to deallocate on Close.
func (c *conn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	if c.router != nil && c.be == nil {
		if _, named := WorkspaceFromContext(ctx); !named && c.ws == "" {
			// db.Prepare at start-up, before any workspace: the statement
			// is checked by the server when it first runs.
			return &stmt{conn: c, query: query, numInput: -1}, nil
		}
	}
	be, err := c.backend(ctx)
	if err != nil {
		return nil, err
	}
	sd, err := be.pc.Conn().PgConn().Prepare(ctx, "", query, nil)
	if err != nil {
		return nil, err
	}
	return &stmt{conn: c, query: query, numInput: len(sd.ParamOIDs)}, nil
}

func (c *conn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

func (c *conn) BeginTx(ctx context.Context, opts driver.TxOptions) (_ driver.Tx, err error) {
	ctx, span := c.startStatement(ctx, "BEGIN", "")
	var be *backend
	defer func() { c.endStatement(span, be, err) }()
	if be, err = c.backend(ctx); err != nil {
		return nil, err
	}
	return be.pc.BeginTx(ctx, opts)
}

func (c *conn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (_ driver.Result, err error) {
	ctx, span := c.startStatement(ctx, "", query)
	var be *backend
	defer func() { c.endStatement(span, be, err) }()
	if be, err = c.backend(ctx); err != nil {
		return nil, err
	}
	return be.pc.ExecContext(ctx, query, args)
}

// QueryContext's span ends when the first response arrives; reading the
// rows is the caller's time.
func (c *conn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (_ driver.Rows, err error) {
	ctx, span := c.startStatement(ctx, "", query)
	var be *backend
	defer func() { c.endStatement(span, be, err) }()
	if be, err = c.backend(ctx); err != nil {
		return nil, err
	}
	return be.pc.QueryContext(ctx, query, args)
}

func (c *conn) Ping(ctx context.Context) (err error) {
	ctx, span := c.startStatement(ctx, "ping", "")
	var be *backend
	defer func() { c.endStatement(span, be, err) }()
	if c.router != nil && c.be == nil && c.ws == "" {
		if _, named := WorkspaceFromContext(ctx); !named {
			// gorm.Open's ping and readiness probes name no workspace:
			// they ask whether the server is there, not a database.
			return c.router.ping(ctx)
		}
	}
	if be, err = c.backend(ctx); err != nil {
		return err
	}
	return be.pc.Ping(ctx)
}

// CheckNamedValue accepts every argument, as pgx's stdlib does: pgx encodes
// driver.Valuer, sql.Scanner types and its own types natively. It needs no
// backend, which database/sql asks for before the statement runs.
func (c *conn) CheckNamedValue(*driver.NamedValue) error { return nil }

// stmt is a statement prepared with db.Prepare: its text, run on the
// handle's backend of the moment.
type stmt struct {
	conn     *conn
	query    string
	numInput int
}

var (
	_ driver.StmtExecContext  = (*stmt)(nil)
	_ driver.StmtQueryContext = (*stmt)(nil)
)

func (s *stmt) Close() error  { return nil }
func (s *stmt) NumInput() int { return s.numInput }

func (s *stmt) Exec(args []driver.Value) (driver.Result, error) {
	return s.ExecContext(context.Background(), named(args))
}

func (s *stmt) Query(args []driver.Value) (driver.Rows, error) {
	return s.QueryContext(context.Background(), named(args))
}

func (s *stmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	return s.conn.ExecContext(ctx, s.query, args)
}

func (s *stmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	return s.conn.QueryContext(ctx, s.query, args)
}

func named(args []driver.Value) []driver.NamedValue {
	nv := make([]driver.NamedValue, len(args))
	for i, v := range args {
		nv[i] = driver.NamedValue{Ordinal: i + 1, Value: v}
	}
	return nv
}

// PgxConn returns the *pgx.Conn of the backend under a handle of this
// driver, for use inside (*sql.Conn).Raw: COPY, LISTEN/NOTIFY, pgx types.
// The backend stays with the handle for as long as the *sql.Conn is held,
// so the driver never evicts it while the *pgx.Conn is in use. Do not keep
// the *pgx.Conn after Raw returns, and do not close it: the driver owns it.
func PgxConn(driverConn any) (*pgx.Conn, error) {
	c, ok := driverConn.(*conn)
	if !ok {
		return nil, errors.New("tenantpg: PgxConn: not a tenantpg connection (call it inside (*sql.Conn).Raw)")
	}
	be, err := c.backend(context.Background())
	if err != nil {
		return nil, err
	}
	return be.pc.Conn(), nil
}
