package tenantpg_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"net/http"
	"time"

	"github.com/DATA-DOG/go-sqlmock"
	"github.com/tenantpg/tenantpg"
)

// The one-line change: open each workspace's database with the "tenantpg"
// driver instead of "pgx". Every *sql.DB opened this way shares one budget.
func Example() {
	db, err := sql.Open("tenantpg", "postgres://app:secret@localhost:5432/notifuse_ws_abc?workspace=abc")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	// Let database/sql queue this workspace's callers at its cap (3 by
	// default) instead of asking the driver for more; OpenDB does this.
	db.SetMaxOpenConns(3)
}

// OpenDB opens a workspace and sets the *sql.DB's own limits to agree with
// the budget.
func ExampleOpenDB() {
	db, err := tenantpg.OpenDB("postgres://app:secret@localhost:5432/notifuse_ws_abc?workspace=abc")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
}

// Configure sets the registered driver's settings from code, in place of
// the TENANTPG_* environment variables. It may be called again at run time.
func ExampleConfigure() {
	err := tenantpg.Configure(tenantpg.Config{
		MaxConnections:      90, // the budget, below the server's max_connections
		MaxConnectionsPerDB: 3,
		ConnMaxLifetime:     10 * time.Minute,
		ConnMaxIdleTime:     5 * time.Minute,
		AcquireTimeout:      5 * time.Second,
	})
	if err != nil {
		log.Fatal(err)
	}
}

// A system database with connections set aside for it alone, beside the
// workspace databases.
func ExampleOpenDB_reserved() {
	system, err := tenantpg.OpenDB("postgres://app:secret@localhost:5432/notifuse_system?workspace=system&pool_max_conns=10&pool_reserved_conns=5")
	if err != nil {
		log.Fatal(err)
	}
	defer system.Close()
}

// When the budget stays full for longer than the caller can wait, the error
// matches ErrBudgetExhausted: answer 503 and ask the client to retry.
func ExampleErrBudgetExhausted() {
	handler := func(db *sql.DB) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			var n int
			err := db.QueryRowContext(r.Context(), "SELECT count(*) FROM contacts").Scan(&n)
			var be *tenantpg.BudgetError
			switch {
			case errors.As(err, &be):
				w.Header().Set("Retry-After", "1")
				http.Error(w, "busy, retry shortly", http.StatusServiceUnavailable)
				log.Printf("workspace %s waited %s: %d/%d connections open", be.Workspace, be.Waited, be.Open, be.Limit)
			case err != nil:
				http.Error(w, "internal error", http.StatusInternalServerError)
			default:
				fmt.Fprintln(w, n)
			}
		}
	}
	_ = handler
}

// PgxConn reaches the *pgx.Conn under a database/sql connection, for COPY,
// LISTEN/NOTIFY or pgx types. The connection stays checked out, so the
// driver never evicts it, until Raw returns.
func ExamplePgxConn() {
	ctx := context.Background()
	db, err := tenantpg.OpenDB("postgres://app:secret@localhost:5432/notifuse_ws_abc")
	if err != nil {
		log.Fatal(err)
	}
	conn, err := db.Conn(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	err = conn.Raw(func(driverConn any) error {
		pc, err := tenantpg.PgxConn(driverConn)
		if err != nil {
			return err
		}
		_, err = pc.Exec(ctx, "LISTEN contacts_changed")
		return err
	})
	if err != nil {
		log.Fatal(err)
	}
}

// Driver.Stats reports what the server sees, per database and in total.
func ExampleDriver_Stats() {
	s := tenantpg.Default().Stats()
	fmt.Printf("%d/%d connections, %d waiting, %d databases active\n", s.Open, s.Limit, s.Waiting, s.ActiveDatabases)
}

// NewDriver makes a driver with a budget of its own, registered under a name
// of your choice.
func ExampleNewDriver() {
	drv, err := tenantpg.NewDriver(tenantpg.Config{MaxConnections: 20})
	if err != nil {
		log.Fatal(err)
	}
	sql.Register("tenantpg-reports", drv)
	db, err := sql.Open("tenantpg-reports", "postgres://reports@localhost:5432/analytics")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
}

// NewWorkspaces replaces an application's map of pools: each workspace's
// *sql.DB is opened once, on first use, through the budget. The id replaces
// {workspace} in the parsed DSN's database name, so no id can change the
// host, the user or any other setting.
func ExampleNewWorkspaces() {
	workspaces, err := tenantpg.NewWorkspaces(tenantpg.WorkspacesConfig{
		Pattern: "postgres://app:secret@localhost:5432/notifuse_ws_{workspace}",
	})
	if err != nil {
		log.Fatal(err)
	}
	defer workspaces.Close()

	db, err := workspaces.DB(context.Background(), "abc")
	if err != nil {
		log.Fatal(err)
	}
	var n int
	_ = db.QueryRowContext(context.Background(), "SELECT count(*) FROM contacts").Scan(&n)
}

// WorkspacesConfig.Open lets a unit test run the code on top of the registry
// without a server: it hands out go-sqlmock databases, one per workspace
// DSN (the pattern with the id written in), instead of opening them
// through the driver.
func ExampleWorkspacesConfig_Open() {
	// The test's setup: a mock for workspace "abc", with its expectations.
	mockDB, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(sqlmock.QueryMatcherEqual))
	if err != nil {
		log.Fatal(err)
	}
	mock.ExpectQuery("SELECT count(*) FROM contacts").
		WillReturnRows(sqlmock.NewRows([]string{"count"}).AddRow(3))
	mock.ExpectClose()
	mocks := map[string]*sql.DB{"postgres://app@localhost:5432/notifuse_ws_abc": mockDB}

	workspaces, err := tenantpg.NewWorkspaces(tenantpg.WorkspacesConfig{
		Pattern: "postgres://app@localhost:5432/notifuse_ws_{workspace}",
		Open: func(dsn string) (*sql.DB, error) {
			if db, ok := mocks[dsn]; ok {
				return db, nil
			}
			return nil, fmt.Errorf("no mock for this workspace")
		},
	})
	if err != nil {
		log.Fatal(err)
	}

	// The code under test.
	db, err := workspaces.DB(context.Background(), "abc")
	if err != nil {
		log.Fatal(err)
	}
	var n int
	if err := db.QueryRowContext(context.Background(), "SELECT count(*) FROM contacts").Scan(&n); err != nil {
		log.Fatal(err)
	}
	fmt.Println("contacts:", n)

	// The test's checks: Close closed the mock, and every expectation was met.
	if err := workspaces.Close(); err != nil {
		log.Fatal(err)
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		log.Fatal(err)
	}
	// Output: contacts: 3
}
