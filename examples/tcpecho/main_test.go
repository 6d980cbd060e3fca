package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestNoLineCut runs line clients that send each line in two parts with a
// pause between, so goodbyes land mid-line, through 5 upgrades and a final
// SIGTERM: every line is echoed exactly once and intact. With hand-off
// (the default) the connections are carried to each new process: no BYE,
// no reconnect. With -no-handoff every connection ends with BYE (never a
// bare close or reset) and its client reconnects to the new process.
func TestNoLineCut(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
	}{{"handoff", nil}, {"bye", []string{"-no-handoff"}}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			noLineCut(t, tc.name == "handoff", tc.args)
		})
	}
}

func noLineCut(t *testing.T, handoff bool, args []string) {
	const clients, upgrades = 20, 5
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/tcpecho", loadtest.Config{NoHTTP: true,
		Args: append([]string{"-goodbye-spread", "100ms", "-drain-timeout", "10s"}, args...)})

	var echoed, byes atomic.Int64
	var mu sync.Mutex
	var failures []string
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		failures = append(failures, fmt.Sprintf(format, args...))
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client(i, srv.Addr, stop, &echoed, &byes, fail)
		}()
	}
	waitEchoes := func(n int64) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for echoed.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("only %d lines echoed", echoed.Load())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	for i := range upgrades {
		waitEchoes(echoed.Load() + 200)
		u, err := srv.Upgrade(ctx, 30*time.Second)
		require.NoError(t, err, "upgrade %d", i+1)
		assert.Equal(t, 0, u.ExitCode)
	}
	waitEchoes(echoed.Load() + 200)
	close(stop)
	wg.Wait()
	code, err := srv.Stop(ctx, 20*time.Second)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	assert.Empty(t, failures)
	if handoff {
		assert.Zero(t, byes.Load(), "connections were carried over, not closed")
	} else {
		assert.GreaterOrEqual(t, byes.Load(), int64(clients*upgrades), "every connection of every generation said BYE")
	}
	t.Logf("%d lines echoed, %d goodbyes", echoed.Load(), byes.Load())
}

// client sends lines until stop, reconnecting after each BYE and resending
// the line the BYE answered.
func client(id int, addr string, stop <-chan struct{}, echoed, byes *atomic.Int64, fail func(string, ...any)) {
	var pending string
	for seq := 0; ; {
		select {
		case <-stop:
			return
		default:
		}
		c, err := net.Dial("tcp", addr)
		if err != nil {
			fail("client %d: dial: %v", id, err)
			return
		}
		r := bufio.NewReader(c)
		for {
			select {
			case <-stop:
				c.Close()
				return
			default:
			}
			if pending == "" {
				seq++
				pending = fmt.Sprintf("client %d line %d %s\n", id, seq, randomText())
			}
			c.SetDeadline(time.Now().Add(15 * time.Second))
			half := len(pending) / 2
			_, werr := io.WriteString(c, pending[:half])
			if werr == nil {
				time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
				_, werr = io.WriteString(c, pending[half:])
			}
			// After a write error the BYE may still be waiting to be read.
			got, rerr := r.ReadString('\n')
			switch {
			case got == "BYE\n":
				byes.Add(1)
				c.Close()
			case rerr != nil:
				fail("client %d: connection ended without BYE: write: %v, read: %v", id, werr, rerr)
				c.Close()
				return
			case got != pending:
				fail("client %d: got %q for %q", id, got, pending)
				c.Close()
				return
			default:
				echoed.Add(1)
				pending = ""
				continue
			}
			break // reconnect and resend pending
		}
	}
}

func randomText() string {
	b := make([]byte, 16+rand.IntN(200))
	for i := range b {
		b[i] = 'a' + byte(rand.IntN(26))
	}
	return string(b)
}

// readSignal is a server-side conn that reports its first read of data.
type readSignal struct {
	net.Conn
	once sync.Once
	read chan struct{}
}

func (r *readSignal) Read(b []byte) (int, error) {
	n, err := r.Conn.Read(b)
	if n > 0 {
		r.once.Do(func() { close(r.read) })
	}
	return n, err
}

// TestGoodbyeMidLine pins the rule the upgrade test relies on: a goodbye
// that arrives while a line is half received waits for the rest, echoes the
// whole line and only then says BYE; with nothing pending, BYE comes at once.
func TestGoodbyeMidLine(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	for _, midLine := range []bool{true, false} {
		client, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		defer client.Close()
		client.SetDeadline(time.Now().Add(10 * time.Second))
		sc, err := ln.Accept()
		require.NoError(t, err)
		server := &readSignal{Conn: sc, read: make(chan struct{})}
		ctx, goodbye := context.WithCancel(context.Background())
		defer goodbye()
		done := make(chan struct{})
		go func() {
			defer close(done)
			defer sc.Close()
			session(ctx, server, func(net.Conn) error { return errors.New("no successor") })
		}()
		r := bufio.NewReader(client)
		if midLine {
			_, err = io.WriteString(client, "hello wo")
			require.NoError(t, err)
			<-server.read // the server holds half a line
			goodbye()
			_, err = io.WriteString(client, "rld\n")
			require.NoError(t, err)
			got, err := r.ReadString('\n')
			require.NoError(t, err)
			assert.Equal(t, "hello world\n", got, "the line in progress is finished and echoed")
		} else {
			goodbye()
		}
		got, err := r.ReadString('\n')
		require.NoError(t, err)
		assert.Equal(t, "BYE\n", got)
		client.Close()
		<-done
	}
}
