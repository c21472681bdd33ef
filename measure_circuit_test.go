package tenantpg

import (
	"context"
	"database/sql"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The measurements behind RELIABILITY.md's restart and half-open figures.
// They assert nothing and run only with TENANTPG_MEASURE=1. They use only
// APIs older than the circuit, so that the same file (with
// internal/pgtest's Shutdown and Start) measures the code before it:
//
//	TENANTPG_MEASURE=1 go test -count=1 -run TestMeasure -v .
func measuring(t *testing.T) {
	if os.Getenv("TENANTPG_MEASURE") == "" {
		t.Skip("a measurement: set TENANTPG_MEASURE=1")
	}
}

// TestMeasureRestart: 16 workers, 8 databases, an outage of 1.5s; counts errors.
func TestMeasureRestart(t *testing.T) {
	measuring(t)
	e := newEnv(t, 8, Config{MaxConnections: 8, AcquireTimeout: 10 * time.Second})
	dbs := make([]*sql.DB, 8)
	for i := range dbs {
		dbs[i] = e.open(i)
	}
	var ok atomic.Int64
	var failed errCollector
	stop := readLoad(dbs, 16, &ok, &failed)
	for ok.Load() < 500 {
		time.Sleep(time.Millisecond)
	}
	dials0 := e.drv.Stats().Dials
	if err := e.srv.Shutdown(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // the outage's length is what is measured
	dials1 := e.drv.Stats().Dials
	if err := e.srv.Start(); err != nil {
		t.Fatal(err)
	}
	up := ok.Load()
	for ok.Load() < up+500 {
		time.Sleep(time.Millisecond)
	}
	stop()
	t.Logf("MEASURE restart: ok %d failed %d dials during outage %d", ok.Load(), len(failed.list()), dials1-dials0)
}

// TestMeasureHalfOpen: 8 callers with 500ms deadlines for 2s at a host that never answers.
func TestMeasureHalfOpen(t *testing.T) {
	measuring(t)
	e := newEnv(t, 1, Config{MaxConnections: 8, MaxConnectionsPerDB: 3, AcquireTimeout: 5 * time.Second})
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	var accepted atomic.Int64
	var mu sync.Mutex
	var held []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	hung, _ := e.drv.OpenDB("postgres://app:x@" + ln.Addr().String() + "/hung?sslmode=disable&workspace=hung")
	good := e.open(0)
	var peak int
	var wg sync.WaitGroup
	var errs atomic.Int64
	end := time.Now().Add(2 * time.Second)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
				if hung.PingContext(ctx) != nil {
					errs.Add(1)
				}
				cancel()
			}
		}()
	}
	var goodLat time.Duration
	for time.Now().Before(end) {
		st := time.Now()
		queryOne(t, good)
		goodLat = max(goodLat, time.Since(st))
		if n := dbStats(e.drv.Stats(), "hung").Open; n > peak {
			peak = n
		}
		time.Sleep(10 * time.Millisecond)
	}
	wg.Wait()
	t.Logf("MEASURE half-open: failed calls %d, connections accepted by the hung host %d, peak tokens held for it %d, worst other-workspace query %s",
		errs.Load(), accepted.Load(), peak, goodLat)
	for dbStats(e.drv.Stats(), "hung").Open > 0 {
		time.Sleep(10 * time.Millisecond)
	}
	ln.Close()
	mu.Lock()
	for _, c := range held {
		c.Close()
	}
	mu.Unlock()
	hung.Close()
}
