// Command otel wires tenantpg's metrics into the OpenTelemetry SDK with the
// Prometheus exporter, serves /metrics and the stats snapshot, and runs
// multi-tenant traffic against a throwaway PostgreSQL (or DATABASE_URL, a
// superuser URL) so there is something to watch.
//
//	go run ./examples/otel
//	curl -s localhost:9464/metrics | grep -E '^(db_client_connection|tenantpg_)'
//	curl -s -H 'Authorization: Bearer demo-token' localhost:9464/stats
//
// The stats endpoint reveals workspace names and load, so it is mounted
// behind the application's authentication, here a fixed bearer token.
package main

import (
	"context"
	"crypto/subtle"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/tenantpg/tenantpg"
	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

type options struct {
	addr       string
	token      string
	workspaces int
	budget     int
	workers    int
	duration   time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.addr, "addr", "127.0.0.1:9464", "address to serve /metrics and /stats on")
	flag.StringVar(&o.token, "token", "demo-token", "bearer token the /stats endpoint requires")
	flag.IntVar(&o.workspaces, "workspaces", 100, "workspace databases to create")
	flag.IntVar(&o.budget, "budget", 12, "connection budget")
	flag.IntVar(&o.workers, "workers", 16, "concurrent goroutines issuing queries")
	flag.DurationVar(&o.duration, "duration", time.Minute, "how long to run traffic")
	flag.Parse()
	err := run(context.Background(), o, os.Stdout, func(addr string) {
		fmt.Printf("serving http://%s/metrics and http://%s/stats (Authorization: Bearer %s)\n", addr, addr, o.token)
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "otel:", err)
		os.Exit(1)
	}
}

// run serves the endpoints and runs traffic for o.duration; ready is called
// with the listening address once the endpoints answer.
func run(ctx context.Context, o options, out io.Writer, ready func(addr string)) error {
	world, err := demo.Start(ctx, o.workspaces, o.budget)
	if err != nil {
		return err
	}
	defer world.Stop()

	// The OpenTelemetry SDK with a Prometheus exporter on its own registry.
	registry := prometheus.NewRegistry()
	exporter, err := otelprom.New(otelprom.WithRegisterer(registry))
	if err != nil {
		return err
	}
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))
	defer provider.Shutdown(context.Background())

	drv, err := tenantpg.NewDriver(tenantpg.Config{
		MaxConnections:      o.budget,
		MaxConnectionsPerDB: 3,
		MeterProvider:       provider,
		Logger:              slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return err
	}
	defer drv.Close()
	dbs := make([]*sql.DB, len(world.DSNs))
	for i, dsn := range world.DSNs {
		if dbs[i], err = drv.OpenDB(dsn); err != nil {
			return err
		}
		defer dbs[i].Close()
	}

	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(registry, promhttp.HandlerOpts{}))
	mux.Handle("/stats", requireToken(o.token, tenantpg.StatsHandler(drv)))
	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		return err
	}
	httpSrv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go httpSrv.Serve(ln)
	defer httpSrv.Close()
	ready(ln.Addr().String())

	trafficCtx, stop := context.WithTimeout(ctx, o.duration)
	defer stop()
	var counters demo.Counters
	demo.Traffic(trafficCtx, o.workspaces, o.workers, &counters, func(ctx context.Context, i int) error {
		var n int
		return dbs[i].QueryRowContext(ctx, "SELECT count(*) FROM pg_class").Scan(&n)
	})
	fmt.Fprintf(out, "%d queries, %d errors\n", counters.Ops.Load(), counters.Errors.Load())
	if err := counters.FirstError(); err != nil {
		return errors.Join(errors.New("traffic saw errors"), err)
	}
	return nil
}

// requireToken stands in for the application's own authentication.
func requireToken(token string, next http.Handler) http.Handler {
	want := []byte("Bearer " + token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}
