// Command quickstart shows tenantpg keeping hundreds of workspace databases
// under one small connection budget.
//
// It creates a few hundred workspace databases, opens each one with
// sql.Open("tenantpg", dsn) as an application would, and runs concurrent
// Zipf-skewed traffic over them for a while, printing a status line every
// second and a summary at the end. The database role it uses has a
// CONNECTION LIMIT equal to the budget, so the server itself would refuse a
// connection beyond it.
//
// Without DATABASE_URL it starts a throwaway PostgreSQL from the local
// binaries (initdb and postgres in PATH or /usr/lib/postgresql/*/bin). With
// DATABASE_URL (a superuser URL) it creates its role and databases there,
// under a prefix, and drops them at the end.
//
//	go run ./examples/quickstart
//	go run ./examples/quickstart -workspaces 500 -budget 30 -duration 30s
package main

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tenantpg/tenantpg"
	"github.com/tenantpg/tenantpg/internal/pgtest"
)

type options struct {
	workspaces int
	budget     int
	perDB      int
	workers    int
	duration   time.Duration
}

type result struct {
	ops, errors     int64
	serverPeak      int
	stats           tenantpg.Stats
	naiveWouldNeed  int
	firstError      error
	elapsed         time.Duration
	budget          int
	evictions, dial uint64
}

func main() {
	var o options
	flag.IntVar(&o.workspaces, "workspaces", 300, "workspace databases to create")
	flag.IntVar(&o.budget, "budget", 20, "connection budget (physical connections across all workspaces)")
	flag.IntVar(&o.perDB, "per-db", 3, "connections per workspace database")
	flag.IntVar(&o.workers, "workers", 32, "concurrent goroutines issuing queries")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "how long to run traffic")
	flag.Parse()

	res, err := run(context.Background(), o, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
	if res.errors > 0 || res.serverPeak > res.budget {
		os.Exit(1)
	}
}

func run(ctx context.Context, o options, out io.Writer) (*result, error) {
	if url := os.Getenv("DATABASE_URL"); url != "" {
		os.Setenv(pgtest.EnvURL, url)
	}
	fmt.Fprintln(out, "starting PostgreSQL (or attaching to DATABASE_URL)...")
	srv, err := pgtest.Start(pgtest.Options{MaxConnections: o.budget + 20})
	if err != nil {
		return nil, err
	}
	defer srv.Stop()

	fmt.Fprintf(out, "creating %d workspace databases...\n", o.workspaces)
	const password = "quickstart-secret"
	role, err := srv.CreateRole(ctx, "app", password, o.budget)
	if err != nil {
		return nil, err
	}
	names := make([]string, o.workspaces)
	for i := range names {
		names[i] = fmt.Sprintf("ws_%04d", i)
	}
	dbNames, err := srv.CreateDatabases(ctx, role, "", names...)
	if err != nil {
		return nil, err
	}

	// The registered driver: configured once, from code here (or from the
	// TENANTPG_* environment variables when Configure is not called).
	if err := tenantpg.Configure(tenantpg.Config{MaxConnections: o.budget, MaxConnectionsPerDB: o.perDB}); err != nil {
		return nil, err
	}
	dbs := make([]*sql.DB, o.workspaces)
	for i, name := range dbNames {
		dsn := srv.URL(role, password, name) + "&workspace=" + names[i]
		db, err := sql.Open("tenantpg", dsn) // the one-line change from sql.Open("pgx", dsn)
		if err != nil {
			return nil, err
		}
		// Let database/sql queue a busy workspace's callers itself rather
		// than ask the driver for more than the cap (tenantpg.OpenDB does
		// this for you).
		db.SetMaxOpenConns(o.perDB)
		db.SetMaxIdleConns(o.perDB)
		defer db.Close()
		dbs[i] = db
	}

	res := &result{budget: o.budget, naiveWouldNeed: o.workspaces * o.perDB}
	fmt.Fprintf(out, "running %d workers over %d workspaces for %s: budget %d connections (naive pools would need up to %d)\n",
		o.workers, o.workspaces, o.duration, o.budget, res.naiveWouldNeed)

	var ops, errCount atomic.Int64
	var firstErr atomic.Value
	var peak atomic.Int64
	trafficCtx, stop := context.WithTimeout(ctx, o.duration)
	defer stop()
	start := time.Now()

	var wg sync.WaitGroup
	for w := 0; w < o.workers; w++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed))
			z := rand.NewZipf(r, 1.1, 1, uint64(o.workspaces-1))
			for trafficCtx.Err() == nil {
				db := dbs[z.Uint64()]
				qctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				var n int
				err := db.QueryRowContext(qctx, "SELECT count(*) FROM pg_class WHERE relkind = 'r'").Scan(&n)
				cancel()
				if err != nil {
					if errCount.Add(1) == 1 {
						firstErr.Store(err)
					}
					continue
				}
				ops.Add(1)
			}
		}(int64(w))
	}

	// A status line every second; the server's own count of the role's
	// connections is sampled in between.
	ticker := time.NewTicker(time.Second)
	defer ticker.Stop()
	sample := time.NewTicker(20 * time.Millisecond)
	defer sample.Stop()
	trafficDone := make(chan struct{})
	go func() { wg.Wait(); close(trafficDone) }()
	var lastOps int64
	for done := false; !done; {
		select {
		case <-trafficDone:
			done = true
		case <-sample.C:
			if n, err := srv.Backends(ctx, role); err == nil && int64(n) > peak.Load() {
				peak.Store(int64(n))
			}
		case <-ticker.C:
			s := tenantpg.Default().Stats()
			cur := ops.Load()
			fmt.Fprintf(out, "%6.0f ops/s  open %2d/%d (in use %2d, idle %2d)  active workspaces %3d  evictions %6d  waits %6d  errors %d  server peak %d\n",
				float64(cur-lastOps), s.Open, s.Limit, s.InUse, s.Idle, s.ActiveDatabases, sumEvictions(s), s.WaitCount, errCount.Load(), peak.Load())
			lastOps = cur
		}
	}
	res.elapsed = time.Since(start)
	res.ops, res.errors, res.serverPeak = ops.Load(), errCount.Load(), int(peak.Load())
	if e, ok := firstErr.Load().(error); ok {
		res.firstError = e
	}
	res.stats = tenantpg.Default().Stats()
	res.evictions, res.dial = sumEvictions(res.stats), res.stats.Dials

	fmt.Fprintf(out, "\ndone: %d queries in %s (%.0f/s) over %d workspaces\n", res.ops, res.elapsed.Round(time.Millisecond),
		float64(res.ops)/res.elapsed.Seconds(), o.workspaces)
	fmt.Fprintf(out, "errors: %d\n", res.errors)
	if res.firstError != nil {
		fmt.Fprintf(out, "first error: %v\n", res.firstError)
	}
	fmt.Fprintf(out, "peak server connections: %d (budget %d, driver's own peak %d)\n", res.serverPeak, o.budget, res.stats.PeakOpen)
	fmt.Fprintf(out, "connections dialed: %d, evictions: %v, waits: %d (total %s), timeouts: %d\n",
		res.dial, res.stats.Evictions, res.stats.WaitCount, res.stats.WaitDuration.Round(time.Millisecond), res.stats.Timeouts)
	if res.serverPeak > o.budget {
		return res, errors.New("the server saw more connections than the budget")
	}
	return res, nil
}

func sumEvictions(s tenantpg.Stats) uint64 {
	var n uint64
	for _, v := range s.Evictions {
		n += v
	}
	return n
}
