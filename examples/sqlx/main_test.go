package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/tenantpg/tenantpg"
	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

func TestSqlx(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), 3, 2, &out)
	demo.CheckRun(t, err, out.String())
	if got := strings.Count(out.String(), "3 contacts, In matched 2"); got != 3 {
		t.Fatalf("want 3 workspaces with 3 contacts each:\n%s", out.String())
	}
}

// TestBindStyle fails if sqlx would send "?" placeholders to PostgreSQL for
// the "tenantpg" driver name.
func TestBindStyle(t *testing.T) {
	if got := sqlx.BindType(tenantpg.DriverName); got != sqlx.DOLLAR {
		t.Fatalf("sqlx bind type for %q is %d, want DOLLAR", tenantpg.DriverName, got)
	}
	db := sqlx.NewDb(nil, tenantpg.DriverName)
	if got := db.Rebind("SELECT * FROM t WHERE a = ? AND b = ?"); got != "SELECT * FROM t WHERE a = $1 AND b = $2" {
		t.Fatalf("Rebind gave %q", got)
	}
}
