package tenantpg

import (
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// ErrBudgetExhausted is matched by errors.Is for every error returned when a
// caller found no connection in the budget before its context ended or the
// acquire timeout passed. An HTTP layer typically answers 503 Service
// Unavailable with a Retry-After header.
var ErrBudgetExhausted = errors.New("tenantpg: connection budget exhausted")

// BudgetError is the error a caller gets when it waited for a connection in
// the budget and got none. errors.Is(err, ErrBudgetExhausted) is true for it;
// when the caller's own context ended the wait, it also wraps that context's
// error, so errors.Is(err, context.Canceled) works too.
type BudgetError struct {
	Workspace    string        // the workspace label of the database asked for
	Database     string        // the database name
	Server       string        // host:port of its server, whose budget it waited for
	Open         int           // connections held to that server, across its databases, when the wait ended
	Limit        int           // that server's budget
	DatabaseOpen int           // connections held by this database
	DatabaseCap  int           // this database's cap
	Waiting      int           // other callers still waiting for a connection to Server
	Waited       time.Duration // how long this caller waited
	Err          error         // the caller's context error, or nil when the acquire timeout ended the wait
}

func (e *BudgetError) Error() string {
	s := fmt.Sprintf("tenantpg: connection budget exhausted: workspace %q (database %q) waited %s; %d/%d connections open to %s, %d/%d for this database, %d waiting",
		e.Workspace, e.Database, e.Waited.Round(time.Millisecond), e.Open, e.Limit, e.Server, e.DatabaseOpen, e.DatabaseCap, e.Waiting)
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Is reports whether target is ErrBudgetExhausted.
func (e *BudgetError) Is(target error) bool { return target == ErrBudgetExhausted }

// Unwrap returns the caller's context error, if that is what ended the wait.
func (e *BudgetError) Unwrap() error { return e.Err }

// ConnectError is returned when a dial to the server fails after a token was
// taken (the token is already given back). It wraps what pgx's error wraps,
// so errors.As(err, &*pgconn.PgError) finds the server's SQLSTATE, for
// example 53300 when the server itself has no connection slot left or 28P01
// for a wrong password, and errors.Is and errors.As find the network's and
// the context's errors. pgx's *pgconn.ConnectError itself is not reachable:
// its Config holds the password. The text is pgx's, without the password.
type ConnectError struct {
	Workspace string
	Database  string
	Err       error
	// Attempts is how many dials the server refused for lack of connection
	// slots (SQLSTATE 53300) before the deadline; 0 for other failures.
	Attempts int

	// down: the dial found the server down (its circuit opened), so its
	// caller may wait for the probe instead of failing.
	down bool

	// ctxErr is the context's error when the dial ran out of time: pgconn
	// reports a dial that hit the context's deadline as a network timeout
	// when the deadline fires before the context notices.
	ctxErr error
}

func (e *ConnectError) Error() string {
	if e.Attempts > 0 {
		return fmt.Sprintf("tenantpg: workspace %q: connect to database %q: the server refused %d attempts for lack of connection slots (its limit is below the budget; other clients?): %v",
			e.Workspace, e.Database, e.Attempts, e.Err)
	}
	return fmt.Sprintf("tenantpg: workspace %q: connect to database %q: %v", e.Workspace, e.Database, e.Err)
}

// Unwrap returns pgx's error and, when the dial ran out of time, the
// context's error, so errors.Is(err, context.DeadlineExceeded) holds.
func (e *ConnectError) Unwrap() []error {
	if e.ctxErr != nil {
		return []error{e.Err, e.ctxErr}
	}
	return []error{e.Err}
}

// dialCause is a failed dial's error as the driver keeps and returns it:
// pgx's error with every wrapper on the way to a *pgconn.ConnectError or
// *pgconn.ParseConfigError taken out, because those carry the DSN's
// settings, password included, to anyone with errors.As. The rest of the
// tree stays, so matching a SQLSTATE, a net error or a context error works
// as it does on pgx's own error.
type dialCause struct {
	msg  string
	errs []error
}

func (e *dialCause) Error() string   { return e.msg }
func (e *dialCause) Unwrap() []error { return e.errs }

// scrubDialError returns err without the errors that carry a DSN's
// settings and, in its text, without password. An error that holds
// neither is returned as it is.
func scrubDialError(err error, password string) error {
	if err == nil {
		return nil
	}
	msg := scrub(err.Error(), "", []string{password})
	if !carriesConfig(err) && msg == err.Error() {
		return err
	}
	return &dialCause{msg: msg, errs: withoutConfig(err)}
}

func carriesConfig(err error) bool {
	return errors.As(err, new(*pgconn.ConnectError)) || errors.As(err, new(*pgconn.ParseConfigError))
}

// withoutConfig returns the largest subtrees of err that carry no DSN
// settings. A wrapper on the way to one is dropped, its text living on in
// dialCause's; anything of unknown shape that carries one is dropped whole.
func withoutConfig(err error) []error {
	if !carriesConfig(err) {
		return []error{err}
	}
	var safe []error
	switch u := err.(type) {
	case interface{ Unwrap() error }:
		if inner := u.Unwrap(); inner != nil {
			safe = withoutConfig(inner)
		}
	case interface{ Unwrap() []error }:
		for _, inner := range u.Unwrap() {
			if inner != nil {
				safe = append(safe, withoutConfig(inner)...)
			}
		}
	}
	return safe
}

// ErrServerDown is matched by errors.Is for the error a caller gets when its
// wait for a connection ended while the server of its database was down:
// unreachable, refusing connections, shutting down or starting up, or not
// answering. The driver retries such a server with one probe dial at a time
// and lets the waiting callers proceed when it answers; a caller gets this
// error only when its context or the acquire timeout ends first. Like
// ErrBudgetExhausted, it is a 503 Service Unavailable for an HTTP layer.
var ErrServerDown = errors.New("tenantpg: server down")

// ServerDownError is the error behind ErrServerDown. It wraps what the last
// dial found (a *pgconn.PgError such as 57P03 "the database system is
// starting up", a network error, or the caller's own *ConnectError when its
// dial found the server down) and, when the caller's own context ended the
// wait, that context's error. It names the server by host and port and
// never contains a password or a DSN.
type ServerDownError struct {
	Workspace string        // the workspace label of the database asked for
	Database  string        // the database name
	Server    string        // host:port
	Down      time.Duration // how long the server had been down when the wait ended
	Waited    time.Duration // how long this caller waited
	Waiting   int           // callers still waiting on this server
	Err       error         // what the last dial found

	ctxErr error // the caller's context error, when that ended the wait
}

func (e *ServerDownError) Error() string {
	s := fmt.Sprintf("tenantpg: workspace %q (database %q): server %s down for %s; waited %s, %d waiting",
		e.Workspace, e.Database, e.Server, e.Down.Round(time.Millisecond), e.Waited.Round(time.Millisecond), e.Waiting)
	if e.ctxErr != nil {
		s += ": " + e.ctxErr.Error()
	}
	if e.Err != nil {
		s += ": last dial: " + e.Err.Error()
	}
	return s
}

// Is reports whether target is ErrServerDown.
func (e *ServerDownError) Is(target error) bool { return target == ErrServerDown }

// Unwrap returns what the last dial found and, when the caller's context
// ended the wait, its error.
func (e *ServerDownError) Unwrap() []error {
	var errs []error
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	if e.ctxErr != nil {
		errs = append(errs, e.ctxErr)
	}
	return errs
}

// DSNError reports a data source name that cannot be used. It never contains
// the DSN or its password.
type DSNError struct {
	Workspace string // best effort: the workspace label or database name, when they could be read
	Reason    string
}

func (e *DSNError) Error() string {
	if e.Workspace == "" {
		return "tenantpg: invalid DSN: " + e.Reason
	}
	return fmt.Sprintf("tenantpg: workspace %q: invalid DSN: %s", e.Workspace, e.Reason)
}

// ErrNoWorkspace is returned by a call on a *sql.DB or Pool opened with a
// {workspace} DSN when the call's context names no workspace: such a
// database has no default. Name one with WithWorkspace. A ping that names
// none is a health check of the server instead.
var ErrNoWorkspace = errors.New("tenantpg: the context names no workspace; this database serves every workspace of its " +
	WorkspacePlaceholder + " DSN: pass tenantpg.WithWorkspace(ctx, id)")

// WorkspaceMismatchError is returned when a call names a workspace other
// than the one its connection is on: a transaction, a *sql.Conn or Raw
// stays on the workspace it started on.
type WorkspaceMismatchError struct {
	Bound     string // the workspace the connection is on
	Requested string // the workspace the call's context names
}

func (e *WorkspaceMismatchError) Error() string {
	return fmt.Sprintf("tenantpg: the context names workspace %q, but this connection (a transaction, *sql.Conn or Raw) is on workspace %q",
		e.Requested, e.Bound)
}

var errDBClosed = errors.New("tenantpg: database closed")

// ConfigError reports an invalid setting in Config or in the environment.
type ConfigError struct {
	Field  string // the Config field or environment variable
	Reason string
}

func (e *ConfigError) Error() string {
	return fmt.Sprintf("tenantpg: invalid %s: %s", e.Field, e.Reason)
}

func errReservedExceedsBudget(limit, reserved int) string {
	return fmt.Sprintf("budget %d is below the %d connections databases have reserved (pool_reserved_conns)", limit, reserved)
}
