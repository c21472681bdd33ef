package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" driver: naive, seed-style, PgBouncer and single-database contenders

	"github.com/tenantpg/tenantpg"
)

// target is one contender set up against one trace's workspaces.
type target interface {
	exec(ctx context.Context, o op) error
	close() error
}

// statser is implemented by the tenantpg target: its driver's own counters.
type statser interface {
	stats() tenantpg.Stats
}

// contender opens a target. open returns an error wrapping errUnavailable
// when the contender cannot run here at all (PgBouncer not installed); the
// report then says why in that row instead of the run failing.
type contender struct {
	name string
	open func(ctx context.Context, e *env, workspaces int) (target, error)
}

var errUnavailable = errors.New("unavailable")

// env is what a contender needs to open itself.
type env struct {
	w              *world
	budget         int
	workers        int
	acquireTimeout time.Duration
	pgbouncerBin   string   // "" when not installed
	pgbouncerSet   []string // extra settings, name=value
	tenantpgPerDB  int      // tenantpg's MaxConnectionsPerDB, 0 = its default
	naivePerDB     int      // naive's SetMaxOpenConns per workspace, 0 = perDB
	naiveSameDB    bool     // naive's pools all reach workspace 0's database
}

const perDB = 3 // every contender's per-workspace cap, the seed's and tenantpg's default

const (
	queryRead  = "SELECT v FROM kv WHERE id = $1"
	queryWrite = "UPDATE kv SET v = $2 WHERE id = $1"
	// queryNeighbour is the noisy neighbour's statement: neighbourSleep.
	queryNeighbour = "SELECT pg_sleep(0.5)"
)

// runOp runs one operation of the trace on db.
func runOp(ctx context.Context, db *sql.DB, o op) error {
	if o.neighbour {
		_, err := db.ExecContext(ctx, queryNeighbour)
		return err
	}
	if o.write {
		_, err := db.ExecContext(ctx, queryWrite, o.key, "written by the benchmark")
		return err
	}
	var v string
	return db.QueryRowContext(ctx, queryRead, o.key).Scan(&v)
}

// allContenders, in the order they run.
var allContenders = []contender{
	{"tenantpg", openTenantpg},
	{"seed-style", openSeed},
	{"pgbouncer", openPgbouncer},
	{"naive", openNaive},
	{"single-db", openSingle},
	{"dial-each", openDialEach},
	{"tenantpg-nokeycache", openTenantpgNoKeyCache},
}

func contenderNames() []string {
	names := make([]string, len(allContenders))
	for i, c := range allContenders {
		names[i] = c.name
	}
	return names
}

// defaultContenders are the ones a run without -contenders compares:
// dial-each is a reference point for experiments, not a contender, and
// tenantpg-nokeycache is tenantpg without its SCRAM key cache, to measure
// the cache side by side.
func defaultContenders() []string {
	return slices.DeleteFunc(contenderNames(), func(n string) bool { return n == "dial-each" || n == "tenantpg-nokeycache" })
}

// poolsTarget serves every operation from the *sql.DB of its workspace.
type poolsTarget struct {
	dbs     []*sql.DB
	onClose func()
}

func (t *poolsTarget) exec(ctx context.Context, o op) error { return runOp(ctx, t.dbs[o.ws], o) }

func (t *poolsTarget) close() error {
	var errs []error
	for _, db := range t.dbs {
		if db != nil {
			errs = append(errs, db.Close())
		}
	}
	if t.onClose != nil {
		t.onClose()
	}
	return errors.Join(errs...)
}

// tenantpg: one driver with budget B, one *sql.DB per workspace through
// (*Driver).OpenDB, the library's defaults otherwise except a shorter
// acquire timeout than the default 10s, so that a starved caller fails
// within the run instead of after it.
type tenantpgTarget struct {
	poolsTarget
	drv *tenantpg.Driver
}

func (t *tenantpgTarget) stats() tenantpg.Stats { return t.drv.Stats() }

func (t *tenantpgTarget) close() error {
	err := t.poolsTarget.close()
	return errors.Join(err, t.drv.Close())
}

func openTenantpg(ctx context.Context, e *env, workspaces int) (target, error) {
	return openTenantpgWith(ctx, e, workspaces, tenantpg.Config{})
}

// openTenantpgNoKeyCache is tenantpg deriving SCRAM keys (PBKDF2) at every
// dial, as pgx does.
func openTenantpgNoKeyCache(ctx context.Context, e *env, workspaces int) (target, error) {
	return openTenantpgWith(ctx, e, workspaces, tenantpg.Config{DisableScramKeyCache: true})
}

func openTenantpgWith(_ context.Context, e *env, workspaces int, cfg tenantpg.Config) (target, error) {
	cfg.MaxConnections, cfg.MaxConnectionsPerDB, cfg.AcquireTimeout = e.budget, e.tenantpgPerDB, e.acquireTimeout
	drv, err := tenantpg.NewDriver(cfg)
	if err != nil {
		return nil, fmt.Errorf("tenantpg: new driver: %w", err)
	}
	t := &tenantpgTarget{drv: drv, poolsTarget: poolsTarget{dbs: make([]*sql.DB, workspaces)}}
	for i := range workspaces {
		db, err := drv.OpenDB(e.w.dsn(i) + "&workspace=" + url.QueryEscape(e.w.labels[i]))
		if err != nil {
			_ = t.close()
			return nil, fmt.Errorf("tenantpg: open workspace %s: %w", e.w.labels[i], err)
		}
		t.dbs[i] = db
	}
	return t, nil
}

// naive: what an application does without any manager, one *sql.DB per
// workspace with a small pool each and nothing capping their sum. Its
// excess connections are refused by the server (53300).
func openNaive(_ context.Context, e *env, workspaces int) (target, error) {
	t := &poolsTarget{dbs: make([]*sql.DB, workspaces)}
	for i := range workspaces {
		dsn := e.w.dsn(i)
		if e.naiveSameDB {
			dsn = e.w.dsn(0)
		}
		db, err := sql.Open("pgx", dsn)
		if err != nil {
			_ = t.close()
			return nil, fmt.Errorf("naive: open workspace %s: %w", e.w.labels[i], err)
		}
		db.SetMaxOpenConns(perDB)
		if e.naivePerDB > 0 {
			// The experiment's pools keep every connection they open;
			// the default naive contender keeps database/sql's 2 idle.
			db.SetMaxOpenConns(e.naivePerDB)
			db.SetMaxIdleConns(e.naivePerDB)
		}
		t.dbs[i] = db
	}
	return t, nil
}

// dial-each: a new server session for every operation, closed after it,
// one *sql.DB per workspace keeping no idle connection. Every operation is
// a miss, so its ops/s is the server's connect rate with the operation
// included, the ceiling of any pooler that must dial: one with hit rate h
// can do at most that rate / (1 - h). Not in the default set.
func openDialEach(_ context.Context, e *env, workspaces int) (target, error) {
	t := &poolsTarget{dbs: make([]*sql.DB, workspaces)}
	for i := range workspaces {
		db, err := sql.Open("pgx", e.w.dsn(i))
		if err != nil {
			_ = t.close()
			return nil, fmt.Errorf("dial-each: open workspace %s: %w", e.w.labels[i], err)
		}
		db.SetMaxIdleConns(0)
		t.dbs[i] = db
	}
	return t, nil
}

// single-db: every operation on one database through one pool of B, the
// upper bound of a server that needs no tenancy at all. It uses the
// trace's keys and write mix but ignores its workspaces.
func openSingle(_ context.Context, e *env, _ int) (target, error) {
	db, err := sql.Open("pgx", e.w.dsn(0))
	if err != nil {
		return nil, fmt.Errorf("single-db: open: %w", err)
	}
	db.SetMaxOpenConns(e.budget)
	db.SetMaxIdleConns(e.budget)
	return &singleTarget{db: db}, nil
}

type singleTarget struct{ db *sql.DB }

func (t *singleTarget) exec(ctx context.Context, o op) error { return runOp(ctx, t.db, o) }
func (t *singleTarget) close() error                         { return t.db.Close() }

// seed-style: the reimplemented manager of seedmanager.go; every operation
// asks it for the workspace's pool first, as the seed's repositories do.
type seedTarget struct {
	m      *seedManager
	labels []string
}

func (t *seedTarget) exec(ctx context.Context, o op) error {
	db, err := t.m.GetWorkspaceConnection(ctx, t.labels[o.ws])
	if err != nil {
		return err
	}
	return runOp(ctx, db, o)
}

func (t *seedTarget) close() error { return t.m.Close() }

func openSeed(_ context.Context, e *env, workspaces int) (target, error) {
	index := make(map[string]int, workspaces)
	for i := range workspaces {
		index[e.w.labels[i]] = i
	}
	m := newSeedManager(e.budget, perDB, func(id string) string { return e.w.dsn(index[id]) })
	return &seedTarget{m: m, labels: e.w.labels[:workspaces]}, nil
}

// pgbouncer: a fresh PgBouncer per run (so that its server connections end
// with the run and the next contender starts on a quiet server), and one
// pgx *sql.DB per workspace pointed at it.
func openPgbouncer(ctx context.Context, e *env, workspaces int) (target, error) {
	if e.pgbouncerBin == "" {
		return nil, fmt.Errorf("pgbouncer: %w: %w", errUnavailable, errNotInstalled)
	}
	b, err := startBouncer(ctx, e.pgbouncerBin, e.w, e.budget, perDB*workspaces+e.workers+100, e.pgbouncerSet)
	if err != nil {
		return nil, err
	}
	t := &poolsTarget{dbs: make([]*sql.DB, workspaces), onClose: b.stop}
	extra := url.Values{"default_query_exec_mode": {"exec"}}
	for i := range workspaces {
		db, err := sql.Open("pgx", e.w.dsnVia(i, "127.0.0.1", b.port, extra))
		if err != nil {
			_ = t.close()
			return nil, fmt.Errorf("pgbouncer: open workspace %s: %w", e.w.labels[i], err)
		}
		db.SetMaxOpenConns(perDB)
		t.dbs[i] = db
	}
	return t, nil
}

// selectContenders returns the named contenders in the order given.
func selectContenders(names []string) ([]contender, error) {
	var out []contender
	for _, n := range names {
		found := false
		for _, c := range allContenders {
			if c.name == n {
				out = append(out, c)
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("unknown contender %q (want some of %s)", n, strings.Join(contenderNames(), ","))
		}
	}
	return out, nil
}
