package tenantpg

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"

	"github.com/jackc/pgx/v5/pgconn"
)

// ErrWorkspacesClosed is returned by Workspaces.DB after Close.
var ErrWorkspacesClosed = errors.New("tenantpg: workspaces closed")

// WorkspacesConfig configures a Workspaces registry. Set Pattern or DSN.
type WorkspacesConfig struct {
	// Pattern is the DSN of every workspace's database: its database name
	// holds WorkspacePlaceholder, as in a DSN that OpenDB routes, for
	// example "postgres://app:secret@db:5432/ws_{workspace}". The DSN is
	// parsed once, and each id replaces the placeholder in the parsed
	// database name, so that an id changes the database name and nothing
	// else: not the host, port, user, password, TLS or a run-time
	// parameter, whatever characters it holds. A name past PostgreSQL's 63
	// bytes is refused.
	Pattern string
	// DSN returns the data source name of a workspace's database, for
	// workspaces that do not all follow one Pattern. A callback that
	// splices the id into the DSN's text lets the id rewrite the DSN, so
	// it is given only ids of URL-unreserved ASCII (letters, digits, - . _
	// ~) and non-ASCII characters other than spaces; DB fails for others.
	// Prefer Pattern.
	DSN func(id string) (string, error)
	// Driver opens the databases; default the registered driver.
	Driver *Driver
	// Open, when set, opens a workspace's database from its DSN instead of
	// the driver. It is the seam for unit tests without a server: return a
	// go-sqlmock *sql.DB (sqlmock.New, or one mock per DSN). A database it
	// returns bypasses the driver, and so the budget, unless it comes from
	// Driver.OpenDB itself. With Pattern, it is given the pattern with the
	// id written in, escaped, and checked to differ from the pattern in the
	// database name alone (an id that cannot be written so fails). Default
	// nil: the driver.
	Open func(dsn string) (*sql.DB, error)
	// CreateIfMissing, when set, is called once when a workspace's database
	// does not exist yet (the first connection fails with SQLSTATE 3D000);
	// the connection is then tried again. It typically runs CREATE DATABASE
	// through the application's system database.
	CreateIfMissing func(ctx context.Context, id string) error
}

// Workspaces maps workspace IDs to their *sql.DB, opening each once, on
// first use, through the driver (or WorkspacesConfig.Open), so
// every workspace shares the driver's budget. It is safe for concurrent use
// and never holds its lock during network I/O: concurrent first calls for
// one workspace wait for a single opening, calls for other workspaces do
// not wait at all.
type Workspaces struct {
	cfg  WorkspacesConfig
	tmpl *dsnParams // Pattern, parsed; nil with DSN

	mu     sync.Mutex
	open   map[string]*workspaceEntry // guarded by mu
	closed bool                       // guarded by mu
}

type workspaceEntry struct {
	ready chan struct{} // closed when db/err are set
	db    *sql.DB
	err   error
}

// NewWorkspaces returns an empty registry. A Pattern that cannot be parsed,
// or has no placeholder in its database name, fails here.
func NewWorkspaces(cfg WorkspacesConfig) (*Workspaces, error) {
	if (cfg.Pattern == "") == (cfg.DSN == nil) {
		return nil, &ConfigError{Field: "WorkspacesConfig.Pattern", Reason: "set Pattern or DSN, one of them"}
	}
	if cfg.Driver == nil {
		cfg.Driver = Default()
	}
	w := &Workspaces{cfg: cfg, open: make(map[string]*workspaceEntry)}
	if cfg.Pattern != "" {
		p, err := parseDSN(cfg.Pattern)
		var de *DSNError
		if errors.As(err, &de) {
			return nil, &ConfigError{Field: "WorkspacesConfig.Pattern", Reason: de.Reason} // never the DSN or its password
		}
		if err != nil {
			return nil, err
		}
		if !p.routed {
			return nil, &ConfigError{Field: "WorkspacesConfig.Pattern", Reason: "its database name has no " + WorkspacePlaceholder + " placeholder"}
		}
		w.tmpl = p
	}
	return w, nil
}

// checkID reports why id cannot name a workspace of w, "" if it can.
func (w *Workspaces) checkID(id string) string {
	if reason := validWorkspace(id); reason != "" || w.tmpl != nil {
		return reason
	}
	return spliceSafe(id)
}

// DB returns the workspace's *sql.DB, opening it on first use. With
// CreateIfMissing set, the first use also connects, to find out whether the
// database exists; otherwise no connection is made until the first query.
// A failed opening is not remembered: the next call tries again.
//
// A hook (DSN, Open, CreateIfMissing) that panics panics in the DB call
// that ran it, as the hook's own bug; the callers waiting for that opening
// get an error instead, and the next call opens anew. An opening that
// CloseWorkspace overtook is closed, and its callers open the workspace
// again, as a DB call after CloseWorkspace would: no caller gets a *sql.DB
// that CloseWorkspace closed while it was being opened.
func (w *Workspaces) DB(ctx context.Context, id string) (*sql.DB, error) {
	if reason := w.checkID(id); reason != "" {
		return nil, workspaceIDError(id, reason)
	}
	for {
		w.mu.Lock()
		if w.closed {
			w.mu.Unlock()
			return nil, ErrWorkspacesClosed
		}
		e, ok := w.open[id]
		if !ok {
			e = &workspaceEntry{ready: make(chan struct{})}
			w.open[id] = e
		}
		w.mu.Unlock()
		if !ok {
			w.opening(ctx, id, e)
		} else {
			select {
			case <-e.ready:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		if e.err != nil {
			return nil, e.err
		}
		w.mu.Lock()
		current, closed := w.open[id] == e, w.closed
		w.mu.Unlock()
		switch {
		case current:
			return e.db, nil
		case closed:
			return nil, ErrWorkspacesClosed
		}
		// CloseWorkspace took the entry while it was opening, and closes
		// its database: open the workspace anew.
	}
}

// opening runs the opening of e, the entry of workspace id, and makes its
// outcome known to the callers waiting for it. Whoever removes an entry
// from the map (CloseWorkspace, Close) closes its database once ready is
// closed; a failed opening removes its own.
func (w *Workspaces) opening(ctx context.Context, id string, e *workspaceEntry) {
	stage := "" // the hook running, if any
	done := false
	defer func() {
		if !done {
			// A hook panicked, or called runtime.Goexit. There is no
			// recover: the panic goes on up this caller's stack with its
			// own trace. The callers waiting on e must not wait for good,
			// nor its entry stay in the map for every later call to wait
			// on.
			what := "opening it"
			if stage != "" {
				what = "the WorkspacesConfig." + stage + " hook"
			}
			e.db, e.err = nil, fmt.Errorf("tenantpg: workspace %q: %s panicked (the panic went to the DB call that ran it)", id, what)
		}
		if e.err != nil {
			w.mu.Lock()
			if w.open[id] == e {
				delete(w.open, id)
			}
			w.mu.Unlock()
		}
		close(e.ready)
	}()
	e.db, e.err = w.openWorkspace(ctx, id, &stage)
	done = true
}

// openWorkspace opens workspace id's database and, with CreateIfMissing,
// creates it if need be. stage names the hook running, for the error of a
// hook that panics.
func (w *Workspaces) openWorkspace(ctx context.Context, id string, stage *string) (*sql.DB, error) {
	db, err := w.openDB(id, stage)
	if err != nil || w.cfg.CreateIfMissing == nil {
		return db, err
	}
	kept := false
	defer func() {
		if !kept {
			db.Close() // on an error, and when CreateIfMissing panics
		}
	}()
	err = db.PingContext(ctx)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "3D000" { // invalid_catalog_name: no such database
		*stage = "CreateIfMissing"
		if err = w.cfg.CreateIfMissing(ctx, id); err != nil {
			return nil, fmt.Errorf("tenantpg: workspace %q: create database: %w", id, err)
		}
		*stage = ""
		err = db.PingContext(ctx)
	}
	if err != nil {
		return nil, err
	}
	kept = true
	return db, nil
}

// openDB opens workspace id's database, connecting to nothing yet.
func (w *Workspaces) openDB(id string, stage *string) (*sql.DB, error) {
	var dsn string
	var p *dsnParams
	var err error
	if w.tmpl != nil {
		if p, err = substitute(w.tmpl, id); err != nil {
			return nil, err
		}
		if w.cfg.Open == nil {
			// Never back through a DSN's text: the parsed pattern with the
			// id in its database name is what the driver opens.
			return w.cfg.Driver.openParams(p)
		}
		if dsn, err = spliceDSN(w.cfg.Pattern, w.tmpl, p); err != nil {
			return nil, err
		}
	} else {
		*stage = "DSN"
		if dsn, err = w.cfg.DSN(id); err != nil {
			return nil, fmt.Errorf("tenantpg: workspace %q: DSN: %w", id, err)
		}
		*stage = ""
	}
	if w.cfg.Open != nil {
		*stage = "Open"
		db, err := w.cfg.Open(dsn)
		*stage = ""
		if err != nil {
			return nil, fmt.Errorf("tenantpg: workspace %q: open: %w", id, err)
		}
		return db, nil
	}
	db, err := w.cfg.Driver.OpenDB(dsn)
	var de *DSNError
	if errors.As(err, &de) {
		de.Workspace = id // the label the DSN gives, if any, is not what the caller asked for
		return nil, de
	}
	if err != nil {
		return nil, fmt.Errorf("tenantpg: workspace %q: open: %w", id, err)
	}
	return db, nil
}

// CloseWorkspace closes one workspace's *sql.DB, if it is open, so that its
// connections give their tokens back; the next DB call opens it again. One
// being opened is closed once opened, and the callers waiting for it open
// the workspace anew.
func (w *Workspaces) CloseWorkspace(id string) error {
	if reason := w.checkID(id); reason != "" {
		return workspaceIDError(id, reason) // never opened: a caller's bug worth seeing
	}
	w.mu.Lock()
	e, ok := w.open[id]
	delete(w.open, id)
	w.mu.Unlock()
	if !ok {
		return nil
	}
	<-e.ready
	if e.db == nil {
		return nil
	}
	return e.db.Close()
}

// Close closes every workspace's *sql.DB; later DB calls fail with
// ErrWorkspacesClosed. The driver itself stays open.
func (w *Workspaces) Close() error {
	w.mu.Lock()
	w.closed = true
	entries := w.open
	w.open = make(map[string]*workspaceEntry)
	w.mu.Unlock()
	var errs []error
	for _, e := range entries {
		<-e.ready
		if e.db != nil {
			errs = append(errs, e.db.Close())
		}
	}
	return errors.Join(errs...)
}
