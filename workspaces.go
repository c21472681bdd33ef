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

// WorkspacesConfig configures a Workspaces registry.
type WorkspacesConfig struct {
	// DSN returns the data source name of a workspace's database, for
	// example by naming the database "app_ws_" + id. Required.
	DSN func(id string) (string, error)
	// Driver opens the databases; default the registered driver.
	Driver *Driver
	// Open, when set, opens a workspace's database from the DSN that DSN
	// returned, instead of Driver.OpenDB. It is the seam for unit tests
	// without a server: return a go-sqlmock *sql.DB (sqlmock.New, or one
	// mock per DSN). A database it returns bypasses the driver, and so the
	// budget, unless it comes from Driver.OpenDB itself. Default nil: the
	// driver's OpenDB.
	Open func(dsn string) (*sql.DB, error)
	// CreateIfMissing, when set, is called once when a workspace's database
	// does not exist yet (the first connection fails with SQLSTATE 3D000);
	// the connection is then tried again. It typically runs CREATE DATABASE
	// through the application's system database.
	CreateIfMissing func(ctx context.Context, id string) error
}

// Workspaces maps workspace IDs to their *sql.DB, opening each once, on
// first use, through the driver's OpenDB (or WorkspacesConfig.Open), so
// every workspace shares the driver's budget. It is safe for concurrent use
// and never holds its lock during network I/O: concurrent first calls for
// one workspace wait for a single opening, calls for other workspaces do
// not wait at all.
type Workspaces struct {
	cfg WorkspacesConfig

	mu     sync.Mutex
	open   map[string]*workspaceEntry // guarded by mu
	closed bool                       // guarded by mu
}

type workspaceEntry struct {
	ready chan struct{} // closed when db/err are set
	db    *sql.DB
	err   error
}

// NewWorkspaces returns an empty registry.
func NewWorkspaces(cfg WorkspacesConfig) (*Workspaces, error) {
	if cfg.DSN == nil {
		return nil, &ConfigError{Field: "WorkspacesConfig.DSN", Reason: "required"}
	}
	if cfg.Driver == nil {
		cfg.Driver = Default()
	}
	return &Workspaces{cfg: cfg, open: make(map[string]*workspaceEntry)}, nil
}

// DB returns the workspace's *sql.DB, opening it on first use. With
// CreateIfMissing set, the first use also connects, to find out whether the
// database exists; otherwise no connection is made until the first query.
// A failed opening is not remembered: the next call tries again.
func (w *Workspaces) DB(ctx context.Context, id string) (*sql.DB, error) {
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
	if ok {
		select {
		case <-e.ready:
			return e.db, e.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}

	e.db, e.err = w.openWorkspace(ctx, id)
	w.mu.Lock()
	if e.err != nil || w.closed {
		if w.open[id] == e { // CloseWorkspace may have replaced it meanwhile
			delete(w.open, id)
		}
		if e.err == nil { // Close ran while this workspace was opening
			e.db.Close()
			e.db, e.err = nil, ErrWorkspacesClosed
		}
	}
	w.mu.Unlock()
	close(e.ready)
	return e.db, e.err
}

func (w *Workspaces) openWorkspace(ctx context.Context, id string) (*sql.DB, error) {
	dsn, err := w.cfg.DSN(id)
	if err != nil {
		return nil, fmt.Errorf("tenantpg: workspace %q: DSN: %w", id, err)
	}
	open := w.cfg.Open
	if open == nil {
		open = w.cfg.Driver.OpenDB
	}
	db, err := open(dsn)
	var de *DSNError
	if err != nil && w.cfg.Open == nil && errors.As(err, &de) {
		de.Workspace = id // the label the DSN gives, if any, is not what the caller asked for
		return nil, de
	}
	if err != nil {
		return nil, fmt.Errorf("tenantpg: workspace %q: open: %w", id, err)
	}
	if w.cfg.CreateIfMissing == nil {
		return db, nil
	}
	err = db.PingContext(ctx)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "3D000" { // invalid_catalog_name: no such database
		if err = w.cfg.CreateIfMissing(ctx, id); err != nil {
			db.Close()
			return nil, fmt.Errorf("tenantpg: workspace %q: create database: %w", id, err)
		}
		err = db.PingContext(ctx)
	}
	if err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

// CloseWorkspace closes one workspace's *sql.DB, if it is open, so that its
// connections give their tokens back; the next DB call opens it again.
func (w *Workspaces) CloseWorkspace(id string) error {
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
