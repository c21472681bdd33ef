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
	"os"
	"time"

	"github.com/tenantpg/tenantpg"
	"github.com/tenantpg/tenantpg/examples/internal/demo"
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
	fmt.Fprintf(out, "starting PostgreSQL (or attaching to DATABASE_URL) and creating %d workspace databases...\n", o.workspaces)
	world, err := demo.Start(ctx, o.workspaces, o.budget)
	if err != nil {
		return nil, err
	}
	defer world.Stop()

	// The registered driver: configured once, from code here (or from the
	// TENANTPG_* environment variables when Configure is not called).
	if err := tenantpg.Configure(tenantpg.Config{MaxConnections: o.budget, MaxConnectionsPerDB: o.perDB}); err != nil {
		return nil, err
	}
	dbs := make([]*sql.DB, o.workspaces)
	for i, dsn := range world.DSNs {
		db, err := sql.Open("tenantpg", dsn) // the one-line change from sql.Open("pgx", dsn)
		if err != nil {
			return nil, err
		}
		// No SetMaxOpenConns: database/sql's connections are handles, and
		// the driver queues a busy workspace's callers and decides how many
		// backends it needs. Idle handles hold no backend; keeping a few
		// saves allocating one per query (tenantpg.OpenDB keeps as many as
		// the budget).
		db.SetMaxIdleConns(o.perDB)
		defer db.Close()
		dbs[i] = db
	}

	res := &result{budget: o.budget, naiveWouldNeed: o.workspaces * o.perDB}
	fmt.Fprintf(out, "running %d workers over %d workspaces for %s: budget %d connections (naive pools would need up to %d)\n",
		o.workers, o.workspaces, o.duration, o.budget, res.naiveWouldNeed)

	var counters demo.Counters
	peak := world.Server.SamplePeak(world.Role, 20*time.Millisecond)
	trafficCtx, stop := context.WithTimeout(ctx, o.duration)
	defer stop()
	start := time.Now()
	trafficDone := make(chan struct{})
	go func() {
		defer close(trafficDone)
		demo.Traffic(trafficCtx, o.workspaces, o.workers, &counters, func(ctx context.Context, i int) error {
			var n int
			return dbs[i].QueryRowContext(ctx, "SELECT count(*) FROM pg_class WHERE relkind = 'r'").Scan(&n)
		})
	}()

	ticker := time.NewTicker(time.Second)
	defer ticker.Stop()
	var lastOps int64
	for done := false; !done; {
		select {
		case <-trafficDone:
			done = true
		case <-ticker.C:
			s := tenantpg.Default().Stats()
			cur := counters.Ops.Load()
			fmt.Fprintf(out, "%6.0f ops/s  open %2d/%d (in use %2d, idle %2d)  active workspaces %3d  evictions %6d  waits %6d  errors %d  server peak %d\n",
				float64(cur-lastOps), s.Open, s.Limit, s.InUse, s.Idle, s.ActiveDatabases, sumEvictions(s), s.WaitCount, counters.Errors.Load(), peak.Peak())
			lastOps = cur
		}
	}
	res.elapsed = time.Since(start)
	res.serverPeak, _ = peak.Stop()
	res.ops, res.errors, res.firstError = counters.Ops.Load(), counters.Errors.Load(), counters.FirstError()
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
