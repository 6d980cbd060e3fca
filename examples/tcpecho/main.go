// Command tcpecho is a raw TCP line-echo server built on graceful's
// ServeConns: every line a client sends comes back unchanged. When the
// process drains, each connection finishes the line it is reading and
// echoes it; then, after an upgrade (SIGHUP), it is handed to the new
// process, which carries on with the client on the same connection; without
// a successor (SIGTERM, or -no-handoff) it sends "BYE" and closes, and the
// client reconnects. No client is ever cut mid-line.
//
//	flags  -addr host:port (default 127.0.0.1:7007), -pidfile path,
//	       -drain-timeout, -goodbye-spread, -no-handoff
//	SIGHUP upgrades in place; SIGTERM drains and exits 0.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"io"
	"log/slog"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/graceful-go/graceful"
)

// finishLine bounds how long a connection told goodbye may take to send the
// rest of the line it is in the middle of.
const finishLine = 2 * time.Second

func main() {
	addr := flag.String("addr", "127.0.0.1:7007", "TCP address to serve on")
	pidfile := flag.String("pidfile", "", "write the PID of the serving process here")
	drain := flag.Duration("drain-timeout", graceful.DefaultDrainTimeout, "hard deadline of a drain")
	spread := flag.Duration("goodbye-spread", 0, "spread the goodbyes over this much of the drain")
	noHandOff := flag.Bool("no-handoff", false, "at upgrades, say BYE instead of handing connections to the new process")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	opts := graceful.Options{Logger: log, PIDFile: *pidfile, DrainTimeout: *drain, GoodbyeSpread: *spread, NoHandOff: *noHandOff}
	if err := run(opts, *addr); err != nil {
		log.Error("exiting", "err", err)
		os.Exit(1)
	}
}

func run(opts graceful.Options, addr string) error {
	p, err := graceful.New(opts)
	if err != nil {
		return err
	}
	ln, err := p.Listen("tcp", addr)
	if err != nil {
		return err
	}
	p.ServeConns(ln, func(ctx context.Context, c net.Conn) {
		session(ctx, c, p.HandOff)
	})
	return p.Run(context.Background())
}

// session echoes on c. When ctx is done (the goodbye), it finishes the line
// in progress, then hands c to the new process or says BYE.
func session(ctx context.Context, c net.Conn, handOff func(net.Conn) error) {
	var bye atomic.Bool
	stop := context.AfterFunc(ctx, func() {
		bye.Store(true)
		c.SetReadDeadline(time.Now()) // wakes the reader in echo
	})
	defer stop()
	echo(c, &bye, handOff)
}

// echo sends every line back. Told goodbye (bye set, read deadline passed),
// it completes the line in progress, then hands the connection to the new
// process (handOff) or, if there is none, says BYE.
func echo(c net.Conn, bye *atomic.Bool, handOff func(net.Conn) error) {
	r := bufio.NewReader(c)
	var partial []byte
	for {
		line, err := r.ReadSlice('\n')
		partial = append(partial, line...)
		if err == nil {
			if _, err := c.Write(partial); err != nil {
				return
			}
			partial = partial[:0]
			continue
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue // a long line: keep reading it
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) || !bye.Load() {
			return // the client left, or a real error
		}
		// Told goodbye. At a line boundary, with nothing read ahead, the
		// connection can go to the new process as it is.
		if len(partial) == 0 && r.Buffered() == 0 && handOff(c) == nil {
			return
		}
		// Bytes of a line that already reached us (in our
		// buffer, or the kernel's: a read that finds them returns at once)
		// are a line in progress: finish it if the client does in time.
		if len(partial) == 0 && r.Buffered() == 0 {
			c.SetReadDeadline(time.Now().Add(time.Millisecond))
			if _, err := r.Peek(1); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				return
			}
		}
		c.SetReadDeadline(time.Now().Add(finishLine))
		for len(partial) > 0 || r.Buffered() > 0 {
			rest, err := r.ReadSlice('\n')
			partial = append(partial, rest...)
			if errors.Is(err, bufio.ErrBufferFull) {
				continue
			}
			if err != nil {
				return // not finished in time: nothing more we can do
			}
			if _, err := c.Write(partial); err != nil {
				return
			}
			partial = partial[:0]
		}
		if handOff(c) == nil {
			return
		}
		c.Write([]byte("BYE\n"))
		lingeringClose(c)
		return
	}
}

// lingeringClose half-closes c and reads what the client still sends until
// it closes, so that the close does not reset the connection and destroy
// the BYE in flight.
func lingeringClose(c net.Conn) {
	if tc, ok := c.(interface{ CloseWrite() error }); ok {
		tc.CloseWrite()
	}
	c.SetReadDeadline(time.Now().Add(time.Second))
	io.Copy(io.Discard, c)
}
