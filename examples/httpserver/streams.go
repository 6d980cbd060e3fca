package main

import (
	"context"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/graceful-go/graceful"
)

// With -stream-handoff, /sse and /ws are written by hand on the hijacked
// connection (no net/http response writer, no WebSocket library's read
// buffer between the socket and us), so that at its goodbye each stream can
// be handed to the new process at a message boundary, with the bytes of a
// message that had begun to arrive: the client sees no close, no
// reconnect, no message lost or repeated. The goodbye stays the fallback
// (no new process, a refused hand-off, TLS).

// handOffStreams registers /sse and /ws, and what the new process does
// with the streams handed to it.
func handOffStreams(p *graceful.Process, mux *http.ServeMux) {
	pid := strconv.Itoa(os.Getpid())
	mux.HandleFunc("GET /sse", func(w http.ResponseWriter, r *http.Request) {
		goodbye := p.Goodbye(r.Context())
		c, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			http.Error(w, "streaming unsupported: "+err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Pid: %s\r\nConnection: close\r\n\r\n", pid)
		sseEvents(p, c, 1, goodbye)
	})
	p.OnStream("sse", func(ctx context.Context, c net.Conn, state []byte) {
		next, err := strconv.Atoi(string(state))
		if err != nil {
			c.Close()
			return
		}
		sseEvents(p, c, next, ctx.Done())
	})
	mux.HandleFunc("GET /ws", func(w http.ResponseWriter, r *http.Request) {
		goodbye := p.Goodbye(r.Context())
		if r.Header.Get("Upgrade") != "websocket" || r.Header.Get("Sec-WebSocket-Key") == "" {
			http.Error(w, "not a WebSocket handshake", http.StatusBadRequest)
			return
		}
		sum := sha1.Sum([]byte(r.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
		c, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		// What the client sent after its handshake, already buffered.
		early, _ := rw.Reader.Peek(rw.Reader.Buffered())
		fmt.Fprintf(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\nX-Pid: %s\r\n\r\n",
			base64.StdEncoding.EncodeToString(sum[:]), pid)
		wsEcho(p, c, append([]byte(nil), early...), goodbye)
	})
	p.OnStream("ws", func(ctx context.Context, c net.Conn, _ []byte) {
		wsEcho(p, c, nil, ctx.Done())
	})
}

// sseEvents sends event next, next+1, ... every 100 ms until the goodbye,
// then hands the stream on (its state: the next event's ID), or asks the
// client to reconnect.
func sseEvents(p *graceful.Process, c net.Conn, next int, goodbye <-chan struct{}) {
	defer c.Close()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			if _, err := fmt.Fprintf(c, "id: %d\ndata: tick\n\n", next); err != nil {
				return
			}
			next++
		case <-goodbye:
			if p.HandOffStream("sse", c, nil, []byte(strconv.Itoa(next))) == nil {
				return
			}
			io.WriteString(c, "event: reconnect\ndata: server restarting\n\n")
			return
		}
	}
}

// frame is one WebSocket frame as received: its opcode and FIN bit, and
// its payload unmasked.
type frame struct {
	op      byte // with the FIN bit
	payload []byte
}

// wsEcho echoes every frame until the goodbye, then hands the connection
// on with the bytes of a frame that had begun to arrive, or closes it with
// 1012 (service restart).
func wsEcho(p *graceful.Process, c net.Conn, early []byte, goodbye <-chan struct{}) {
	defer c.Close()
	frames := make(chan frame)
	var partial []byte // the frame being read, as read so far
	readerDone := make(chan error, 1)
	stop := make(chan struct{})
	defer close(stop) // a reader holding a frame nobody takes ends too
	go func() {
		r := &earlyReader{early: early, c: c}
		for {
			f, err := readFrame(r, &partial)
			if err != nil {
				readerDone <- err
				return
			}
			select {
			case frames <- f:
			case <-stop:
				return
			}
		}
	}()
	echo := func(f frame) bool {
		switch f.op & 0x0f {
		case 0x8: // close: answer it, done
			writeFrame(c, 0x88, f.payload)
			return false
		case 0x9: // ping
			return writeFrame(c, 0x8a, f.payload) == nil
		case 0xa: // pong
			return true
		}
		return writeFrame(c, f.op, f.payload) == nil
	}
	for {
		select {
		case f := <-frames:
			if !echo(f) {
				return
			}
		case <-readerDone:
			return
		case <-goodbye:
			// Stop the reader at once: what it read of a frame stays in
			// partial; frames it completed are echoed first.
			c.SetReadDeadline(time.Unix(1, 0))
			for {
				select {
				case f := <-frames:
					if !echo(f) {
						return
					}
					continue
				case err := <-readerDone:
					if !errors.Is(err, os.ErrDeadlineExceeded) {
						return
					}
				}
				break
			}
			if p.HandOffStream("ws", c, partial, nil) == nil {
				return
			}
			c.SetReadDeadline(time.Time{})
			writeFrame(c, 0x88, append(binary.BigEndian.AppendUint16(nil, 1012), "server restarting"...))
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			io.Copy(io.Discard, c) // the client's close reply
			return
		}
	}
}

// earlyReader reads the bytes buffered before the connection was ours,
// then the connection.
type earlyReader struct {
	early []byte
	c     net.Conn
}

func (r *earlyReader) Read(b []byte) (int, error) {
	if len(r.early) > 0 {
		n := copy(b, r.early)
		r.early = r.early[n:]
		return n, nil
	}
	return r.c.Read(b)
}

// readFrame reads one client frame exactly (no read-ahead), keeping in
// *partial every byte of it read so far, so that an interrupted read leaves
// them there.
func readFrame(r io.Reader, partial *[]byte) (frame, error) {
	*partial = (*partial)[:0]
	read := func(n int) ([]byte, error) {
		start := len(*partial)
		*partial = append(*partial, make([]byte, n)...)
		got, err := io.ReadFull(r, (*partial)[start:])
		*partial = (*partial)[:start+got]
		return (*partial)[start:], err
	}
	hdr, err := read(2)
	if err != nil {
		return frame{}, err
	}
	op, masked, n := hdr[0], hdr[1]&0x80 != 0, uint64(hdr[1]&0x7f)
	switch n {
	case 126:
		ext, err := read(2)
		if err != nil {
			return frame{}, err
		}
		n = uint64(binary.BigEndian.Uint16(ext))
	case 127:
		ext, err := read(8)
		if err != nil {
			return frame{}, err
		}
		n = binary.BigEndian.Uint64(ext)
	}
	if !masked || n > 1<<20 {
		return frame{}, errors.New("websocket: unmasked or oversized client frame")
	}
	key, err := read(4)
	if err != nil {
		return frame{}, err
	}
	mask := [4]byte(key)
	payload, err := read(int(n))
	if err != nil {
		return frame{}, err
	}
	out := make([]byte, n)
	for i := range out {
		out[i] = payload[i] ^ mask[i%4]
	}
	*partial = (*partial)[:0]
	return frame{op: op, payload: out}, nil
}

// writeFrame writes one unmasked server frame.
func writeFrame(c net.Conn, op byte, payload []byte) error {
	b := []byte{op}
	switch n := len(payload); {
	case n < 126:
		b = append(b, byte(n))
	case n < 1<<16:
		b = binary.BigEndian.AppendUint16(append(b, 126), uint16(n))
	default:
		b = binary.BigEndian.AppendUint64(append(b, 127), uint64(n))
	}
	_, err := c.Write(append(b, payload...))
	return err
}
