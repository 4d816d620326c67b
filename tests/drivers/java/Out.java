// Shared by the pgjdbc driver programs: key=value arguments, JSON-line output, the watchdog.

import java.sql.SQLException;
import java.util.HashMap;
import java.util.Map;

final class Out {
    private Out() {}

    static Map<String, String> args(String[] argv) {
        Map<String, String> args = new HashMap<>();
        for (String arg : argv) {
            int eq = arg.indexOf('=');
            args.put(arg.substring(0, eq), arg.substring(eq + 1));
        }
        return args;
    }

    /** Exit 3 with a "watchdog" record if the program is still running after deadline_ms. */
    static void watchdog(Map<String, String> args) {
        long ms = Long.parseLong(args.getOrDefault("deadline_ms", "60000"));
        Thread t = new Thread(() -> {
            try {
                Thread.sleep(ms);
            } catch (InterruptedException e) {
                return;
            }
            emit("{\"event\":\"watchdog\",\"deadline_ms\":" + ms + "}");
            Runtime.getRuntime().halt(3);
        });
        t.setDaemon(true);
        t.start();
    }

    static String url(Map<String, String> args) {
        // Bounded connect, login and reads; everything else is pgjdbc's default (prepareThreshold=5).
        return "jdbc:postgresql://127.0.0.1:" + args.get("port") + "/postgres?user=postgres"
            + "&connectTimeout=10&loginTimeout=10&socketTimeout=60" + args.getOrDefault("url_extra", "");
    }

    static synchronized void emit(String json) {
        System.out.println(json);
        System.out.flush();
    }

    static String q(Object value) {
        if (value == null) {
            return "null";
        }
        StringBuilder sb = new StringBuilder("\"");
        for (char c : value.toString().toCharArray()) {
            switch (c) {
                case '"': sb.append("\\\""); break;
                case '\\': sb.append("\\\\"); break;
                case '\n': sb.append("\\n"); break;
                case '\r': sb.append("\\r"); break;
                case '\t': sb.append("\\t"); break;
                default:
                    if (c < 0x20) {
                        sb.append(String.format("\\u%04x", (int) c));
                    } else {
                        sb.append(c);
                    }
            }
        }
        return sb.append('"').toString();
    }

    /** An error as data: {"code": SQLSTATE, "message": ...}. */
    static String error(Throwable e) {
        String state = e instanceof SQLException ? ((SQLException) e).getSQLState() : e.getClass().getSimpleName();
        return "{\"code\":" + q(state) + ",\"message\":" + q(e.getMessage()) + "}";
    }
}
