// Package demo holds what the example programs share: a throwaway server
// with workspace databases, and Zipf-skewed traffic over them. It is
// internal: the examples are the supported way to read it.
package demo

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// Password is the demo role's password; it never appears in the output.
const Password = "demo-secret-password"

// World is a server with a role whose CONNECTION LIMIT is the budget, so the
// server itself refuses any connection beyond it, and workspace databases
// owned by that role.
type World struct {
	Server     *pgtest.Server
	Role       string
	Workspaces []string // labels
	DSNs       []string // one per workspace, with ?workspace=label
	// RoutedDSN serves every workspace from one *sql.DB: its database name
	// holds tenantpg's {workspace} placeholder, the label from the caller's
	// context (tenantpg.WithWorkspace).
	RoutedDSN string
}

// Start starts a throwaway PostgreSQL (or attaches to DATABASE_URL, a
// superuser URL) and creates n workspace databases.
func Start(ctx context.Context, n, budget int) (*World, error) {
	if url := os.Getenv("DATABASE_URL"); url != "" {
		os.Setenv(pgtest.EnvURL, url)
	}
	srv, err := pgtest.Start(pgtest.Options{MaxConnections: budget + 20})
	if err != nil {
		return nil, err
	}
	w := &World{Server: srv}
	if w.Role, err = srv.CreateRole(ctx, "app", Password, budget); err != nil {
		srv.Stop()
		return nil, err
	}
	w.Workspaces = make([]string, n)
	for i := range w.Workspaces {
		w.Workspaces[i] = fmt.Sprintf("ws_%04d", i)
	}
	names, err := srv.CreateDatabases(ctx, w.Role, "", w.Workspaces...)
	if err != nil {
		srv.Stop()
		return nil, err
	}
	for i, name := range names {
		w.DSNs = append(w.DSNs, srv.URL(w.Role, Password, name)+"&workspace="+w.Workspaces[i])
	}
	if n > 0 {
		prefix := strings.TrimSuffix(names[0], w.Workspaces[0])
		w.RoutedDSN = srv.URL(w.Role, Password, prefix+"{workspace}")
	}
	return w, nil
}

// Stop drops or shuts down what Start made.
func (w *World) Stop() { w.Server.Stop() }

// Counters are the traffic's running totals.
type Counters struct {
	Ops, Errors atomic.Int64
	mu          sync.Mutex
	First       error
}

func (c *Counters) fail(err error) {
	if c.Errors.Add(1) == 1 {
		c.mu.Lock()
		c.First = err
		c.mu.Unlock()
	}
}

// FirstError returns the first error seen, if any.
func (c *Counters) FirstError() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.First
}

// Traffic runs workers goroutines until ctx ends, each calling query on a
// workspace chosen by Zipf (s = 1.1): a few hot workspaces, a long cold
// tail. It returns when every worker has stopped.
func Traffic(ctx context.Context, n, workers int, c *Counters, query func(ctx context.Context, i int) error) {
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed))
			z := rand.NewZipf(r, 1.1, 1, uint64(n-1))
			for ctx.Err() == nil {
				qctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				err := query(qctx, int(z.Uint64()))
				cancel()
				if err != nil {
					c.fail(err)
					continue
				}
				c.Ops.Add(1)
			}
		}(int64(w))
	}
	wg.Wait()
}

// CheckRun ends an example's test on the error its run returned: a skip
// when no PostgreSQL is installed (a failure instead when CI is set) or in
// -short mode, a failure with the program's output for any other error.
func CheckRun(t testing.TB, err error, output string) {
	t.Helper()
	SkipIfNoServer(t, err)
	if err != nil {
		t.Fatalf("%v\n%s", err, output)
	}
}

// SkipIfNoServer skips the test when err says that there is no server to
// run against: in -short mode (pgtest.ErrShort), or when no PostgreSQL is
// installed and CI is not set.
func SkipIfNoServer(t testing.TB, err error) {
	t.Helper()
	if errors.Is(err, pgtest.ErrShort) || errors.Is(err, pgtest.ErrNotFound) && os.Getenv("CI") == "" {
		t.Skip(err)
	}
}
