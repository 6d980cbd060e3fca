package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestTLSResumption: the session ticket keys travel with each upgrade, so a
// client that resumed its TLS session before an upgrade resumes it after,
// through 5 upgrades; with -ticket-keys=false every process has its own
// keys and no client resumes after an upgrade (within one process, it
// still does: the test can tell).
func TestTLSResumption(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for _, c := range []struct {
		name   string
		args   []string
		resume bool
	}{{"keys handed over", nil, true}, {"keys per process", []string{"-ticket-keys=false"}, false}} {
		t.Run(c.name, func(t *testing.T) {
			srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/httpserver", loadtest.Config{
				Args: append([]string{"-tls-self-signed"}, c.args...), TLS: true,
			})
			// Each client keeps its session cache across the upgrades, as a
			// browser or an http.Transport does.
			const clients = 10
			caches := make([]tls.ClientSessionCache, clients)
			for i := range caches {
				caches[i] = tls.NewLRUClientSessionCache(4)
			}
			// handshake connects with client i's cache, makes one request
			// (which delivers the server's tickets), and reports whether the
			// session was resumed and which process answered.
			handshake := func(i int) (resumed bool, pid string) {
				conn, err := tls.Dial("tcp", srv.Addr, &tls.Config{InsecureSkipVerify: true, ClientSessionCache: caches[i]})
				require.NoError(t, err)
				defer conn.Close()
				fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
				resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
				require.NoError(t, err)
				resp.Body.Close()
				require.Equal(t, http.StatusOK, resp.StatusCode)
				return conn.ConnectionState().DidResume, resp.Header.Get("X-Pid")
			}
			for i := range clients {
				resumed, _ := handshake(i)
				require.False(t, resumed, "a first connection has no session to resume")
				resumed, _ = handshake(i)
				require.True(t, resumed, "within one process a session resumes")
			}
			for u := range 5 {
				_, err := srv.Upgrade(ctx, time.Minute)
				require.NoError(t, err)
				resumedAll := 0
				for i := range clients {
					resumed, pid := handshake(i)
					require.Equal(t, fmt.Sprint(srv.PID()), pid)
					if resumed {
						resumedAll++
					}
				}
				if c.resume {
					assert.Equal(t, clients, resumedAll, "upgrade %d: every client resumes", u+1)
				} else {
					assert.Zero(t, resumedAll, "upgrade %d: no client resumes", u+1)
				}
			}
		})
	}
}
